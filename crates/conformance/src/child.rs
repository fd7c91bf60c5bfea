//! Child processes of the multi-process case: the test binary re-executed
//! with a job in an environment variable.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use runstate_core::{Client, RunId, WaitPolicy};
use serde::{Deserialize, Serialize};

use crate::docs::Counter;
use crate::harness::{Ctx, Harness};

/// Holds the job of a child process (JSON).
pub const CHILD_VAR: &str = "RUNSTATE_CONFORMANCE_CHILD";

/// Printed by a child on success, followed by its acknowledged count.
const ACKS: &str = "runstate-conformance-acks=";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Job {
    pub(crate) namespace: String,
    pub(crate) run: String,
    pub(crate) increments: u64,
    /// What the child does: locked increments (the default), or hold a
    /// guard and commit it when told (the stopped-holder case).
    #[serde(default)]
    pub(crate) task: Task,
}

/// A child's task.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum Task {
    /// `increments` locked increments of the counter.
    #[default]
    Increments,
    /// Lock the counter (TTL `increments` ms), print [`LOCKED`], wait for
    /// a line on stdin, then save 999 under the lease as it was, dated now
    /// (a holder paused right after checking its own deadline), and print
    /// the outcome.
    HoldThenCommit,
}

/// Printed by a `HoldThenCommit` child once it holds its guard.
pub(crate) const LOCKED: &str = "runstate-conformance-locked";
/// Printed by a `HoldThenCommit` child with the outcome of its commit.
pub(crate) const OUTCOME: &str = "runstate-conformance-outcome=";

/// Body of the child test: when started by the multi-process case, performs
/// its locked increments and prints how many were acknowledged; run by hand,
/// does nothing.
///
/// # Panics
/// When the job cannot be read or an increment fails.
pub fn child_main<H: Harness>() {
    let Ok(job) = std::env::var(CHILD_VAR) else {
        return;
    };
    let job: Job = serde_json::from_str(&job).expect("a valid child job");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async move {
        let store = H::open(&job.namespace)
            .await
            .expect("child opens the backend")
            .expect("child sees the backend configured");
        let client = Client::new(Arc::clone(&store))
            .with_wait(WaitPolicy::with_timeout(Duration::from_secs(120)));
        let run = client.run(RunId::new(&job.run).expect("valid run id"));
        if let Task::HoldThenCommit = job.task {
            let run = client
                .with_ttl(Duration::from_millis(job.increments))
                .run(run.id().clone());
            let guard = run.lock::<Counter>().await.expect("child locks");
            let version = guard.version().expect("the counter exists").clone();
            println!("{LOCKED}");
            let mut line = String::new();
            tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line))
                .await
                .expect("join")
                .expect("a line on stdin");
            // A holder paused right after it checked its own deadline: its
            // lease as it was, dated now, so only the store can refuse it.
            let lease = guard.lease();
            let stale = lease.renewed(lease.ttl(), std::time::Instant::now());
            let bytes = serde_json::to_vec(&Counter {
                n: 999,
                note: String::new(),
            })
            .expect("encodes");
            let saved = store
                .put(
                    run.id(),
                    &runstate_core::DocName::new("counter").expect("valid"),
                    runstate_core::Bytes::from(bytes),
                    runstate_core::PutOptions::update(version).with_lease(&stale),
                )
                .await;
            let outcome = match saved {
                Ok(_) => "saved".to_owned(),
                Err(error) => format!("{:?}", error.kind()),
            };
            drop(guard);
            println!("{OUTCOME}{outcome}");
            return;
        }
        let mut acks = 0u64;
        for _ in 0..job.increments {
            run.update(|c: &mut Counter| c.n += 1)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "child increment failed: {}",
                        runstate_core::display_chain(&e)
                    )
                });
            acks += 1;
        }
        println!("{ACKS}{acks}");
    });
}

/// The command that re-executes the test binary as child number `index`
/// with `job`, under the harness's wrapper, in a process group of its own.
pub(crate) fn child_command(ctx: &Ctx, job: &Job, index: usize) -> Command {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("the test binary's path");
    let test_name = ctx
        .child_test
        .split_once("::")
        .map_or(ctx.child_test, |(_, rest)| rest);
    let wrapper = (ctx.child_wrapper)(index);
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    command.process_group(0);
    command
        .args([
            test_name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_VAR, serde_json::to_string(job).expect("job encodes"));
    command
}

/// Starts `count` children, each doing `increments` locked increments of
/// the counter of `run`, and returns the sum of their acknowledged counts.
///
/// # Panics
/// When a child cannot start or fails.
pub(crate) async fn spawn_children(ctx: &Ctx, run: &str, count: usize, increments: u64) -> u64 {
    let job = Job {
        namespace: ctx.namespace.clone(),
        run: run.to_owned(),
        increments,
        task: Task::Increments,
    };
    let mut children = Vec::new();
    for index in 0..count {
        let child = child_command(ctx, &job, index)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a child process");
        children.push(child);
    }
    let mut total = 0;
    for child in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("wait for a child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let acks = stdout
            .lines()
            .find_map(|line| line.split_once(ACKS).map(|(_, count)| count.trim()))
            .unwrap_or_else(|| {
                panic!("child printed no acknowledgement; did it run the job?\n{stdout}")
            });
        total += acks.parse::<u64>().expect("a count");
    }
    total
}
