//! The servers the backends' tests need: how to find one that answers, how
//! to start one when none does, and the URL the tests get.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A server some backend's tests talk to.
pub(crate) struct Service {
    /// Its name in `cargo xtask services`.
    pub(crate) name: &'static str,
    /// Where it listens (loopback only).
    pub(crate) addr: &'static str,
    /// The environment variable the tests read, and its value.
    pub(crate) env: (&'static str, &'static str),
    /// A shell command that starts it on this machine.
    pub(crate) start: &'static str,
    /// What to do when it cannot be started.
    pub(crate) hint: &'static str,
}

impl Service {
    fn answers(&self) -> bool {
        self.addr.parse::<SocketAddr>().ok().is_some_and(|addr| {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })
    }

    /// Makes sure it answers, starting it if needed; returns the environment
    /// for the tests.
    pub(crate) fn ensure(&self) -> Result<Vec<(String, String)>, String> {
        if !self.answers() {
            eprintln!(
                "{}: nothing answers on {}; starting it: {}",
                self.name, self.addr, self.start
            );
            let status = std::process::Command::new("sh")
                .args(["-c", self.start])
                .status()
                .map_err(|e| {
                    format!(
                        "{}: could not run `{}`: {e}\n{}",
                        self.name, self.start, self.hint
                    )
                })?;
            let mut waited = 0;
            while !self.answers() && waited < 60 {
                std::thread::sleep(Duration::from_millis(500));
                waited += 1;
            }
            if !self.answers() {
                return Err(format!(
                    "{} does not answer on {} (start command exited with {status}).\n{}",
                    self.name, self.addr, self.hint
                ));
            }
        }
        Ok(vec![(self.env.0.to_owned(), self.env.1.to_owned())])
    }
}

pub(crate) fn command(action: Option<&str>, services: &[&Service]) -> Result<(), String> {
    match action {
        Some("status") | None => {
            if services.is_empty() {
                println!("no backend needs a service (file is embedded)");
            }
            for s in services {
                println!(
                    "{:<10} {:<18} {}",
                    s.name,
                    s.addr,
                    if s.answers() { "up" } else { "down" }
                );
            }
            Ok(())
        }
        Some("up") => {
            for s in services {
                s.ensure()?;
                println!("{:<10} {:<18} up", s.name, s.addr);
            }
            if services.is_empty() {
                println!("no backend needs a service (file is embedded)");
            }
            Ok(())
        }
        Some("down") => {
            // The machine's shared services belong to the machine: xtask only
            // stops what it started itself, and it starts those per run.
            for s in services {
                println!(
                    "{:<10} left running (shared service, not started by xtask)",
                    s.name
                );
            }
            if services.is_empty() {
                println!("no backend needs a service (file is embedded)");
            }
            Ok(())
        }
        Some(other) => Err(format!(
            "unknown services action `{other}` (up, down, status)"
        )),
    }
}
