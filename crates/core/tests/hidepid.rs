//! A live process that `/proc` hides (`hidepid`) is never judged dead.
//!
//! The test re-executes itself in a private mount namespace whose `/proc`
//! is mounted with `hidepid=invisible`, as an unprivileged user, and asks
//! there whether this (root-owned, live) process is alive. Without the
//! `kill(pid, 0)` fallback, the missing `/proc/<pid>` would read as dead,
//! and a waiter would break a live holder's lease.

#![cfg(target_os = "linux")]

use std::process::Command;

use runstate_core::ProcessStamp;
use runstate_core::process::{Liveness, current_stamp, liveness};

const CHILD_VAR: &str = "RUNSTATE_HIDEPID_CHILD";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}

#[test]
fn a_process_hidden_by_hidepid_is_not_dead() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return;
    }
    if !is_root() {
        eprintln!(
            "\n*** SKIPPED a_process_hidden_by_hidepid_is_not_dead: mounting a private /proc \
             needs root; the decision is covered by process::tests ***\n"
        );
        return;
    }
    let ours = current_stamp().expect("linux has /proc");
    let job = serde_json::to_string(&(std::process::id(), ours)).expect("encodes");
    let exe = std::env::current_exe().expect("test binary");
    let script = format!(
        "mount -t proc -o hidepid=invisible proc /proc && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups '{}' --exact hidden_child --ignored --nocapture",
        exe.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env(CHILD_VAR, job)
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("hidden-and-not-dead"),
        "the child did not confirm:\n{stdout}\n{stderr}"
    );
}

#[test]
#[ignore = "run by a_process_hidden_by_hidepid_is_not_dead inside a private mount namespace"]
fn hidden_child() {
    let Ok(job) = std::env::var(CHILD_VAR) else {
        return;
    };
    let (pid, stamp): (u32, ProcessStamp) = serde_json::from_str(&job).expect("job");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "hidepid must hide the parent from this unprivileged child"
    );
    assert_ne!(liveness(pid, &stamp), Liveness::Dead);
    println!("hidden-and-not-dead");
}
