//! Case group 9: Several OS processes updating one document.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Ctx;
use crate::child::{Job, LOCKED, OUTCOME, Task, child_command, spawn_children};
use crate::docs::Counter;

/// 4 processes × 100 locked increments of one document: exactly 400, and
/// every increment acknowledged.
pub async fn multi_process_locked_increments(ctx: Ctx) {
    if !ctx.cross_process() {
        return;
    }
    let run_id = ctx.run("shared");
    ctx.client()
        .run(run_id.clone())
        .save(&Counter::default())
        .await
        .expect("seed");
    let acks = spawn_children(&ctx, run_id.as_str(), 4, 100).await;
    let counter: Counter = ctx.client().run(run_id).load().await.expect("load");
    assert_eq!(acks, 400, "acknowledged increments");
    assert_eq!(counter.n, 400, "stored count");
}

/// The rest of the first line starting with `prefix` a child printed.
async fn wait_for(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, prefix: &str) -> String {
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = rx.recv().await {
            // libtest prints "test NAME ... " before the child's own output,
            // on the same line.
            if let Some((_, rest)) = line.split_once(prefix) {
                return Some(rest.to_owned());
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the holder never printed {prefix}"))
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to the process group a child
/// leads (the child and anything its wrapper started).
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), "--".to_owned(), format!("-{pid}")])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} -- -{pid}");
}

/// A holder process stopped (SIGSTOP) while it holds a guard stops renewing
/// its lease: after its TTL another process takes the lock and saves; when
/// the stopped holder resumes, its save under the old lease — dated as if
/// it had been paused right after checking its own deadline, so no local
/// check can refuse it — is refused by the store with `Fenced`, and the
/// newer save stays. The stopped process is alive all along, so no
/// dead-holder shortcut applies: only fencing protects the data.
pub async fn stopped_holder_process_is_fenced(ctx: Ctx) {
    if !ctx.cross_process() {
        return;
    }
    let run_id = ctx.run("stopped");
    let client = ctx.client();
    let run = client.run(run_id.clone());
    run.save(&Counter::default()).await.expect("seed");
    let job = Job {
        namespace: ctx.namespace.clone(),
        run: run_id.to_string(),
        increments: 1000, // the child's TTL, in ms
        task: Task::HoldThenCommit,
    };
    let mut child = child_command(&ctx, &job, 0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the holder");
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    wait_for(&mut rx, LOCKED).await;
    signal(pid, "STOP");
    // Stopped: no renewal for more than twice the TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let taken = client
        .run(run_id.clone())
        .update(|c: &mut Counter| {
            c.n = 1;
        })
        .await;
    signal(pid, "CONT");
    taken.expect("another process takes the expired lock and saves");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(b"commit\n")
        .expect("tell the holder to commit");
    drop(stdin);
    let outcome = wait_for(&mut rx, OUTCOME).await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait for the holder");
    assert!(status.success(), "the holder failed: {status}");
    assert_eq!(
        outcome, "Fenced",
        "the stopped holder's save must be refused by the store"
    );
    let counter: Counter = run.load().await.expect("load");
    assert_eq!(counter.n, 1, "the newer save stays");
}
