//! A private PostgreSQL server for tests that restart it or kill its
//! connections: initdb in a temporary folder, started on a free loopback
//! port with pg_ctl, stopped by the PID in its own postmaster.pid, never
//! the shared one. PostgreSQL refuses to run as root, so as root it runs
//! as the `postgres` user.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct OwnPostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// The folder holding initdb and pg_ctl, or `None` when not installed.
pub fn binaries() -> Option<PathBuf> {
    let candidates = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            let mut versions: Vec<PathBuf> = dirs
                .filter_map(Result::ok)
                .map(|d| d.path().join("bin"))
                .collect();
            versions.sort();
            versions.reverse();
            versions
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/local/bin"), PathBuf::from("/usr/bin")])
        .find(|dir| dir.join("pg_ctl").exists() && dir.join("initdb").exists())
}

impl OwnPostgres {
    /// Starts a server, or returns `None` when PostgreSQL is not installed.
    pub fn start() -> Option<OwnPostgres> {
        let bin = binaries()?;
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("runstate-own-pg-{port}-{:x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            run(Command::new("chown").args(["postgres:postgres"]).arg(&dir));
        }
        let server = OwnPostgres { port, dir, bin };
        server.as_owner(&[
            "initdb",
            "-D",
            &server.data(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        server.start_again();
        Some(server)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn as_owner(&self, args: &[&str]) -> Output {
        let program = self.bin.join(args[0]);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(&args[1..]).current_dir(&self.dir);
        run(&mut command)
    }

    /// Starts it (again) on the same port and data folder.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.as_owner(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-l",
            &log,
            "-o",
            &options,
            "-w",
            "start",
        ]);
    }

    /// Stops it at once, as a crash would (`-m immediate`): connections
    /// drop, and the next start recovers from the write-ahead log.
    pub fn stop_immediate(&self) {
        self.as_owner(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one SQL statement with psql, as the superuser.
    pub fn psql(&self, sql: &str) -> String {
        let psql = self.bin.join("psql");
        let output = run(Command::new(if psql.exists() {
            psql
        } else {
            PathBuf::from("psql")
        })
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            sql,
        ]));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("start a PostgreSQL tool");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.as_owner(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
        }));
        let _ = std::fs::remove_dir_all(Path::new(&self.dir));
    }
}
