//! Running the real `runstate` binary from the tests, and reading what it
//! printed.

#![allow(dead_code)] // each test crate uses its own part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_runstate");

/// The binary with `args`, `RUNSTATE_URL` set to `url` (if any), and no
/// inherited `RUNSTATE_*`, `RUST_LOG` or `NO_COLOR`.
pub fn command(url: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("RUNSTATE_URL")
        .env_remove("RUNSTATE_FROM_URL")
        .env_remove("RUNSTATE_TO_URL")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    if let Some(url) = url {
        command.env("RUNSTATE_URL", url);
    }
    command
}

/// Runs `command` with `stdin` on standard input and waits for it.
pub fn run(mut command: Command, stdin: Option<&[u8]>) -> Output {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the binary");
    if let Some(bytes) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(bytes)
            .expect("write stdin");
    }
    child.wait_with_output().expect("run the binary")
}

/// Runs the binary with `args`, `RUNSTATE_URL` set to `url` (if any) and
/// `stdin` on standard input.
pub fn runstate(url: Option<&str>, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run(command(url, args), stdin)
}

pub fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, and that a failure printed one error line, at
/// most one hint line, and no panic or backtrace.
pub fn expect(output: &Output, expected: i32) {
    let err = stderr(output);
    assert_eq!(
        code(output),
        expected,
        "exit code\nstdout:\n{}\nstderr:\n{err}",
        stdout(output)
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    if expected != 0 {
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines
                .first()
                .is_some_and(|l| l.starts_with("runstate: error: ")),
            "{err}"
        );
        assert!(lines.len() <= 2, "one error line and a hint: {err}");
        if let Some(hint) = lines.get(1) {
            assert!(hint.starts_with("hint: "), "{err}");
        }
    }
}

pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(output),
            stderr(output)
        );
    })
}

pub fn temp_root(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "runstate-cli-{name}-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

pub fn file_url(root: &Path) -> String {
    format!("file://{}", root.display())
}

/// Every file and folder under `root`, relative, sorted.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .expect("under the root")
                    .display()
                    .to_string(),
            );
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}
