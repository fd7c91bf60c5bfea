//! Where the machine's CPU goes while a benchmark runs: the S3 server's
//! (moto's, when `cargo xtask bench` started it and named its PID in
//! `RUNSTATE_S3_SERVER_PID`), the waited-for child processes' (the
//! `runstate` binary a migration runs) and the whole machine's, read from
//! `/proc` before and after.
//!
//! Moto does its work on one core (a Python server under one interpreter
//! lock), so a rate against S3 is its CPU per request over the share of a
//! core it gets: these figures split a ratio of two S3 rates into the
//! requests each side costs the server and the core the server had. Where
//! `/proc` is missing (not Linux) every figure is `None`.

use std::time::Instant;

/// Names the S3 server's PID (set by `cargo xtask bench` for its moto).
const SERVER_PID_VAR: &str = "RUNSTATE_S3_SERVER_PID";

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    /// The S3 server's user + system time, in clock ticks.
    server: Option<u64>,
    /// This process's waited-for children's user + system time, in ticks.
    children: Option<u64>,
    /// The machine's busy time over all cores (everything but idle and
    /// I/O wait), in ticks.
    machine_busy: Option<u64>,
}

/// CPU spent between two samples, in seconds, and the wall time between.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spent {
    pub wall_secs: f64,
    pub server_secs: Option<f64>,
    pub children_secs: Option<f64>,
    pub machine_busy_secs: Option<f64>,
}

impl Spent {
    /// `items` per second of wall time.
    pub fn per_sec(&self, items: u64) -> f64 {
        items as f64 / self.wall_secs
    }

    /// The S3 server's CPU per item, in milliseconds; `None` when not a
    /// tick of it was counted (too short to measure).
    pub fn server_ms_per(&self, items: u64) -> Option<f64> {
        self.server_secs
            .filter(|s| *s > 0.0)
            .map(|s| s * 1000.0 / items as f64)
    }

    /// The children's CPU per item, in milliseconds.
    pub fn children_ms_per(&self, items: u64) -> Option<f64> {
        self.children_secs.map(|s| s * 1000.0 / items as f64)
    }

    /// The share of one core the S3 server used; `None` when not a tick
    /// of it was counted.
    pub fn server_share(&self) -> Option<f64> {
        self.server_secs
            .filter(|s| *s > 0.0)
            .map(|s| s / self.wall_secs)
    }

    /// The machine's busy cores on average.
    pub fn machine_cores(&self) -> Option<f64> {
        self.machine_busy_secs.map(|s| s / self.wall_secs)
    }
}

/// Takes a sample now.
pub fn sample() -> Sample {
    // Asked (once, of a child process) before anything is read, so that
    // the child's CPU never falls into a window.
    ticks_per_sec();
    Sample {
        at: Instant::now(),
        server: server_pid().and_then(|pid| process_ticks(&format!("/proc/{pid}/stat"), UTIME)),
        children: process_ticks("/proc/self/stat", CUTIME),
        machine_busy: machine_busy_ticks(),
    }
}

impl Sample {
    /// What was spent from this sample to now.
    pub fn spent(&self) -> Spent {
        let now = sample();
        let tick = 1.0 / ticks_per_sec();
        let secs = |before: Option<u64>, after: Option<u64>| {
            before
                .zip(after)
                .map(|(b, a)| a.saturating_sub(b) as f64 * tick)
        };
        Spent {
            wall_secs: now.at.duration_since(self.at).as_secs_f64(),
            server_secs: secs(self.server, now.server),
            children_secs: secs(self.children, now.children),
            machine_busy_secs: secs(self.machine_busy, now.machine_busy),
        }
    }
}

/// The machine's cores, as `/proc/stat` counts them (its first line sums
/// them all, whatever this process may use); `None` without it.
pub fn cores() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cores = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    (cores > 0).then_some(cores)
}

/// The S3 server's PID from `RUNSTATE_S3_SERVER_PID`, when that process
/// is moto (its command line names it): a variable left over from another
/// shell, or a PID reused since, must not report another process's CPU.
pub fn server_pid() -> Option<u32> {
    static PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        let pid: u32 = std::env::var(SERVER_PID_VAR).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if String::from_utf8_lossy(&cmdline).contains("moto") {
            Some(pid)
        } else {
            eprintln!(
                "{SERVER_PID_VAR}={pid} is not a moto process: the S3 server's CPU is not measured"
            );
            None
        }
    })
}

/// Where utime (then stime) is among the fields after a `/proc/<pid>/stat`
/// line's command name: they start with the state, field 3 of proc(5), so
/// field n is at n - 3 (utime is field 14).
const UTIME: usize = 11;
/// Where cutime (then cstime), field 16, is.
const CUTIME: usize = 13;

/// The sum of two consecutive tick fields of a `/proc/<pid>/stat` line,
/// the first at `index` among the fields after the command name (counted
/// from its closing parenthesis: the name may hold spaces).
fn process_ticks(path: &str, index: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace().skip(index);
    let a: u64 = fields.next()?.parse().ok()?;
    let b: u64 = fields.next()?.parse().ok()?;
    Some(a + b)
}

/// All cores' busy ticks from `/proc/stat` (user, nice, system, irq,
/// softirq, steal).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let busy = [0, 1, 2, 5, 6, 7];
    Some(busy.iter().filter_map(|&i| ticks.get(i)).sum())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's USER_HZ on
/// every common architecture, when it cannot be asked).
fn ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}
