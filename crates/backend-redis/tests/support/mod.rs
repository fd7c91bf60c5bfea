//! A private redis-server for tests that restart, pause or kill it: started
//! on a free loopback port with its data folder under target/, stopped by
//! its PID, never the shared one.

#![allow(dead_code)]

pub mod cluster;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

/// A free loopback port; for a cluster node (`bus`), one whose cluster
/// bus port (10000 above it) is free as well.
fn free_port(bus: bool) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !bus
            || port
                .checked_add(10_000)
                .is_some_and(|bus| TcpListener::bind(("127.0.0.1", bus)).is_ok())
        {
            return port;
        }
    }
}

impl OwnRedis {
    /// Starts a server; `persistent` makes it fsync every write to its
    /// append-only file, so a restart keeps everything acknowledged.
    ///
    /// A port found free may be taken before the server binds it (other
    /// tests start servers and connections at the same time, and a cluster
    /// node also needs the port 10000 above it): a server that does not
    /// start is stopped and started again on other ports, five times at
    /// most.
    pub fn start(persistent: bool, extra: &[&str]) -> OwnRedis {
        let bus = extra.contains(&"--cluster-enabled");
        for _ in 0..4 {
            let mut server = Self::prepare(free_port(bus), persistent, extra);
            if server.try_spawn() {
                return server;
            }
            eprintln!(
                "own redis-server on port {} did not start; trying another port",
                server.port
            );
        }
        let mut server = Self::prepare(free_port(bus), persistent, extra);
        server.spawn();
        server
    }

    fn prepare(port: u16, persistent: bool, extra: &[&str]) -> OwnRedis {
        // Under target/ (Cargo's scratch folder for integration tests),
        // removed when the server is dropped.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runstate-own-redis-{port}-{:x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--dir".into(),
            dir.display().to_string(),
            "--daemonize".into(),
            "no".into(),
        ];
        if persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        OwnRedis {
            child: None,
            port,
            dir,
            args,
        }
    }

    fn spawn(&mut self) {
        if !self.try_spawn() {
            panic!("own redis-server on port {} did not start", self.port);
        }
    }

    /// Starts the server and waits until it answers; a server that does not
    /// is stopped by its PID.
    fn try_spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian: apt-get install redis-server)");
        self.child = Some(child);
        if self.wait_ready() {
            return true;
        }
        self.kill();
        false
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                if stream.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    // +PONG, or -NOAUTH from a server that wants a password.
                    if stream.read_exact(&mut buf).is_ok()
                        && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
                    {
                        // The answer may be another test's server on a port
                        // ours could not bind: ours then exits at once.
                        std::thread::sleep(Duration::from_millis(100));
                        return self
                            .child
                            .as_mut()
                            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                    }
                }
            }
            // Exited (its port taken, say): no use waiting.
            if self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the server with SIGKILL (by its PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the server by its PID.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -{signal} failed");
        }
    }

    /// Whether it runs (it was not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on the same port and data folder.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Its loopback address, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one command over a fresh raw connection and returns the reply.
    pub fn command(&self, parts: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut request = format!("*{}\r\n", parts.len());
        for part in parts {
            request.push_str(&format!("${}\r\n{part}\r\n", part.len()));
        }
        stream.write_all(request.as_bytes()).expect("send");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).expect("reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
