//! Who this process is, and whether another process on this host is alive.
//!
//! A lease records its holder's host name, pid and a [`ProcessStamp`]. A
//! waiter on the same host can then prove the holder died (its pid is gone,
//! or now belongs to a process that started later) and break the lease at
//! once instead of waiting out the TTL. The stamp pins the pid to one boot of
//! one kernel and one pid namespace, so a recycled pid, a reboot or a
//! container with its own pid numbering never makes a live holder look dead.

use std::fs;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// What identifies a process beyond its pid, on Linux: the kernel boot, the
/// pid namespace and the process start time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessStamp {
    /// `/proc/sys/kernel/random/boot_id` of the kernel the process runs on.
    pub boot_id: String,
    /// Inode of the process's pid namespace (`/proc/self/ns/pid`).
    pub pid_ns: u64,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_ticks: u64,
}

/// Whether a process is known to be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs.
    Alive,
    /// It is gone (or a zombie, or its pid now belongs to another process).
    Dead,
    /// This host cannot tell (another machine, another boot, another pid
    /// namespace, or no `/proc`).
    Unknown,
}

/// This host's name (from `/proc/sys/kernel/hostname`, then `$HOSTNAME`),
/// or `"unknown-host"`.
pub fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "unknown-host".to_owned())
    })
}

/// The stamp of the current process, or `None` where `/proc` does not
/// describe it (not Linux, or `/proc` mounted for another pid namespace).
pub fn current_stamp() -> Option<&'static ProcessStamp> {
    static STAMP: OnceLock<Option<ProcessStamp>> = OnceLock::new();
    STAMP
        .get_or_init(|| {
            let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            let pid_ns = read_pid_ns("/proc/self/ns/pid")?;
            let stat = fs::read_to_string("/proc/self/stat").ok()?;
            let (pid, _, start_ticks) = parse_stat(&stat)?;
            // `/proc` must be the procfs of our own pid namespace, or pids
            // read from it would name other processes.
            if pid != std::process::id() {
                return None;
            }
            Some(ProcessStamp {
                boot_id: boot_id.trim().to_owned(),
                pid_ns,
                start_ticks,
            })
        })
        .as_ref()
}

/// Whether the process `pid` with `stamp` is alive, judged on this host.
pub fn liveness(pid: u32, stamp: &ProcessStamp) -> Liveness {
    let Some(ours) = current_stamp() else {
        return Liveness::Unknown;
    };
    if ours.boot_id != stamp.boot_id || ours.pid_ns != stamp.pid_ns {
        return Liveness::Unknown;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Dead,
        Err(_) => Liveness::Unknown,
        Ok(stat) => match parse_stat(&stat) {
            None => Liveness::Unknown,
            Some((_, state, start)) => {
                if start != stamp.start_ticks || matches!(state, 'Z' | 'X' | 'x') {
                    Liveness::Dead
                } else {
                    Liveness::Alive
                }
            }
        },
    }
}

fn read_pid_ns(path: &str) -> Option<u64> {
    let link = fs::read_link(path).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Parses `/proc/PID/stat` into (pid, state, start time in ticks). The
/// command name may contain spaces and parentheses, so fields are counted
/// from the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, char, u64)> {
    let pid = stat.split_whitespace().next()?.parse().ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; `starttime` is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((pid, state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(parse_stat(line), Some((1234, 'S', 987_654)));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_is_alive_and_a_finished_child_is_dead() {
        let ours = current_stamp().expect("linux has /proc");
        assert_eq!(liveness(std::process::id(), ours), Liveness::Alive);

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let stamp = ProcessStamp {
            start_ticks: 1,
            ..ours.clone()
        };
        assert_eq!(liveness(pid, &stamp), Liveness::Dead);

        let elsewhere = ProcessStamp {
            boot_id: "another-boot".into(),
            ..ours.clone()
        };
        assert_eq!(liveness(pid, &elsewhere), Liveness::Unknown);
    }
}
