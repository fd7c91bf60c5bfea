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
    /// The program that must be installed to start it.
    pub(crate) program: &'static str,
    /// A shell command, run from the workspace root, that starts it.
    pub(crate) start: &'static str,
    /// What to do when it cannot be started.
    pub(crate) hint: &'static str,
    /// An idempotent shell command run once it answers (creating the test
    /// database, say).
    pub(crate) prepare: Option<&'static str>,
}

/// Redis for the Redis backend. When none answers on 6379, one is started
/// in the background with its files under `target/services/redis` (it keeps
/// nothing on disk) and left running for later test runs; `services down`
/// stops it by the PID it wrote.
pub(crate) const REDIS: Service = Service {
    name: "redis",
    addr: "127.0.0.1:6379",
    env: ("RUNSTATE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    program: "redis-server",
    start: "mkdir -p target/services/redis && redis-server --daemonize yes --bind 127.0.0.1 \
            --port 6379 --save '' --appendonly no --dir target/services/redis \
            --logfile redis.log --pidfile \"$PWD/target/services/redis/redis.pid\"",
    hint: "install Redis (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), \
           or point RUNSTATE_REDIS_URL at a running server",
    prepare: None,
};

/// PostgreSQL for the SQL backend, with trust authentication on loopback
/// and a `test` database (created when missing).
pub(crate) const POSTGRES: Service = Service {
    name: "postgres",
    addr: "127.0.0.1:5432",
    env: (
        "RUNSTATE_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ),
    program: "pg_ctlcluster",
    start: "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | sort -V | tail -n 1)\" main start",
    hint: "install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) with trust authentication \
           for postgres@127.0.0.1, or point RUNSTATE_POSTGRES_URL at a server with a `test` database",
    prepare: Some(
        "psql -h 127.0.0.1 -U postgres -d postgres -Atc \"SELECT 1 FROM pg_database WHERE datname = 'test'\" \
         | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test'",
    ),
};

/// MariaDB (or MySQL) for the SQL backend, root without a password on
/// loopback, with a `test` database (created when missing).
pub(crate) const MARIADB: Service = Service {
    name: "mariadb",
    addr: "127.0.0.1:3306",
    env: ("RUNSTATE_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
    program: "mariadbd",
    start: "start-stop-daemon --start --oknodo --background --exec \"$(command -v mariadbd)\"",
    hint: "install MariaDB (Debian/Ubuntu: apt-get install mariadb-server) with passwordless root \
           on 127.0.0.1, or point RUNSTATE_MYSQL_URL at a server with a `test` database",
    prepare: Some("mariadb -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS test'"),
};

fn installed(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
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
        // A URL given by the caller wins: the tests then use that server.
        if let Ok(url) = std::env::var(self.env.0) {
            eprintln!(
                "{}: using {}={} from the environment",
                self.name,
                self.env.0,
                redact(&url)
            );
            return Ok(vec![(self.env.0.to_owned(), url)]);
        }
        if !self.answers() {
            if !installed(self.program) {
                return Err(format!(
                    "{}: nothing answers on {} and `{}` is not installed: {}",
                    self.name, self.addr, self.program, self.hint
                ));
            }
            eprintln!(
                "{}: nothing answers on {}; starting it: {}",
                self.name, self.addr, self.start
            );
            let status = std::process::Command::new("sh")
                .args(["-c", self.start])
                .current_dir(crate::root())
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
        if let Some(prepare) = self.prepare {
            let status = std::process::Command::new("sh")
                .args(["-c", prepare])
                .current_dir(crate::root())
                .status()
                .map_err(|e| format!("{}: could not prepare it: {e}", self.name))?;
            if !status.success() {
                return Err(format!(
                    "{}: `{prepare}` failed ({status}).\n{}",
                    self.name, self.hint
                ));
            }
        }
        Ok(vec![(self.env.0.to_owned(), self.env.1.to_owned())])
    }
}

/// A URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
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

/// moto's S3 server, for the S3 backend: installed into a virtual
/// environment under `target/services/moto` (PyPI `moto[server]` 5.x),
/// started on a free loopback port with a bucket for the tests, and
/// stopped by its PID when dropped.
///
/// It runs through `moto_serial.py`, which makes the writes of any one
/// object one at a time (and a write of more than one object alone):
/// moto checks a conditional PUT's `If-Match` and then stores the object
/// without a lock between the two, so two racing conditional writes could
/// both succeed, which S3 never allows (the script says more).
pub(crate) struct Moto {
    child: std::process::Child,
    port: u16,
}

const MOTO_BUCKET: &str = "runstate-test";
/// Names the PID of the moto this xtask started, for the benchmarks.
const MOTO_PID_VAR: &str = "RUNSTATE_S3_SERVER_PID";
/// The launcher that makes moto's writes of one object one at a time.
const MOTO_SERIAL: &str = include_str!("moto_serial.py");
const MOTO_HINT: &str = "the S3 tests run moto (PyPI `moto[server]` 5.x) in a virtual environment under \
                         target/services/moto: they need python3 with the venv module and access to PyPI, \
                         or point RUNSTATE_S3_URL (and the AWS_* variables) at an S3 server";

impl Moto {
    pub(crate) fn start() -> Result<Moto, String> {
        let dir = crate::root().join("target/services/moto");
        let venv = dir.join("venv");
        let python = venv.join("bin/python");
        let server = venv.join("bin/moto_server");
        if !server.exists() {
            eprintln!("moto: installing moto[server] into {}", venv.display());
            std::fs::create_dir_all(&dir).map_err(|e| format!("moto: {e}"))?;
            let created = std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .map_err(|e| format!("moto: could not run python3: {e}\n{MOTO_HINT}"))?;
            let installed = created.success()
                && std::process::Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", "moto[server]>=5,<6"])
                    .status()
                    .is_ok_and(|s| s.success());
            if !installed || !server.exists() {
                return Err(format!("moto: installation failed.\n{MOTO_HINT}"));
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("moto: no free port: {e}"))?;
        let log = std::fs::File::create(dir.join("moto.log")).map_err(|e| format!("moto: {e}"))?;
        // Written whole under a name of this process, then renamed: another
        // xtask starting moto at the same time never runs half a script.
        let launcher = dir.join("moto_serial.py");
        let staged = dir.join(format!(
            "moto_serial.py.{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged)
            .and_then(|mut file| std::io::Write::write_all(&mut file, MOTO_SERIAL.as_bytes()))
            .and_then(|()| std::fs::rename(&staged, &launcher));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&staged);
            return Err(format!("moto: writing {}: {e}", launcher.display()));
        }
        let child = std::process::Command::new(&python)
            .arg(&launcher)
            .args(["127.0.0.1", &port.to_string()])
            .stdout(log.try_clone().map_err(|e| format!("moto: {e}"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "moto: could not start {}: {e}\n{MOTO_HINT}",
                    launcher.display()
                )
            })?;
        let moto = Moto { child, port };
        let addr = format!("127.0.0.1:{port}");
        let mut waited = 0;
        while TcpStream::connect_timeout(
            &addr.parse().map_err(|e| format!("{e}"))?,
            Duration::from_millis(200),
        )
        .is_err()
        {
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
            if waited > 200 {
                return Err(format!(
                    "moto: did not answer on {addr} (see {})",
                    dir.join("moto.log").display()
                ));
            }
        }
        let created = std::process::Command::new(&python)
            .args([
                "-c",
                &format!(
                    "import boto3; boto3.client('s3', endpoint_url='http://{addr}', region_name='us-east-1', \
                     aws_access_key_id='testing', aws_secret_access_key='testing').create_bucket(Bucket='{MOTO_BUCKET}')"
                ),
            ])
            .status()
            .map_err(|e| format!("moto: {e}"))?;
        if !created.success() {
            return Err(format!(
                "moto: could not create the test bucket.\n{MOTO_HINT}"
            ));
        }
        eprintln!(
            "moto: S3 server on {addr} (pid {}), bucket {MOTO_BUCKET}",
            moto.child.id()
        );
        Ok(moto)
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "RUNSTATE_S3_URL".to_owned(),
                format!(
                    "s3://{MOTO_BUCKET}/ci?endpoint=http://127.0.0.1:{}&region=us-east-1&allow_http=true",
                    self.port
                ),
            ),
            ("AWS_ACCESS_KEY_ID".to_owned(), "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), "testing".to_owned()),
            ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
            // The benchmarks read its CPU time from /proc/<pid>/stat: on
            // S3 the server's one core is what a rate is measured against.
            (MOTO_PID_VAR.to_owned(), self.child.id().to_string()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        eprintln!("moto: stopping pid {}", self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The variable naming the Python the WEPPcloud worker tests run.
pub(crate) const WEPPCLOUD_PYTHON_VAR: &str = "RUNSTATE_WEPPCLOUD_PYTHON";

const WEPPCLOUD_PYTHON_HINT: &str = "the WEPPcloud worker tests run Python workers with the `redis` \
                                     package (PyPI `redis`) from a virtual environment under \
                                     target/services/weppcloud-python: they need python3 with the \
                                     venv module and access to PyPI, or set \
                                     RUNSTATE_WEPPCLOUD_PYTHON to a Python that can `import redis`";

/// The Python of a virtual environment under
/// `target/services/weppcloud-python` with PyPI's `redis` package
/// installed (as for moto), made when missing: the WEPPcloud worker tests
/// run it beside runstate's workers.
pub(crate) fn weppcloud_python() -> Result<std::path::PathBuf, String> {
    let dir = crate::root().join("target/services/weppcloud-python");
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let imports = |python: &std::path::Path| {
        std::process::Command::new(python)
            .args(["-c", "import redis"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports(&python) {
        return Ok(python);
    }
    eprintln!("weppcloud-python: installing redis into {}", venv.display());
    std::fs::create_dir_all(&dir).map_err(|e| format!("weppcloud-python: {e}"))?;
    let created = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map_err(|e| {
            format!("weppcloud-python: could not run python3: {e}\n{WEPPCLOUD_PYTHON_HINT}")
        })?;
    let installed = created.success()
        && std::process::Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "redis>=4,<7"])
            .status()
            .is_ok_and(|s| s.success());
    if !installed || !imports(&python) {
        return Err(format!(
            "weppcloud-python: installation failed.\n{WEPPCLOUD_PYTHON_HINT}"
        ));
    }
    Ok(python)
}

const AZURITE_HINT: &str = "the S3 backend's Azure conformance test runs Azurite (npm package                             `azurite` 3.x) from target/services/azurite: it needs Node.js with npm                             and access to the npm registry";

/// Azurite (Azure Blob Storage's emulator) under `target/services/azurite`,
/// installed with npm when missing: the S3 backend's `az://` conformance
/// test starts it itself on a free port and stops it by PID.
pub(crate) fn azurite() -> Result<(), String> {
    let dir = crate::root().join("target/services/azurite");
    if dir.join("node_modules/.bin/azurite-blob").exists() {
        return Ok(());
    }
    eprintln!("azurite: installing azurite into {}", dir.display());
    std::fs::create_dir_all(&dir).map_err(|e| format!("azurite: {e}"))?;
    let installed = std::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&dir)
        .arg("azurite@3")
        .status()
        .map_err(|e| format!("azurite: could not run npm: {e}\n{AZURITE_HINT}"))?;
    if !installed.success() || !dir.join("node_modules/.bin/azurite-blob").exists() {
        return Err(format!("azurite: installation failed.\n{AZURITE_HINT}"));
    }
    Ok(())
}

/// The variable the Redis Cluster tests read.
pub(crate) const REDIS_CLUSTER_VAR: &str = "RUNSTATE_REDIS_CLUSTER_URL";

const REDIS_CLUSTER_HINT: &str = "the Redis Cluster tests start redis-server (with --cluster-enabled) \
                                  and redis-cli --cluster create: install Redis ≥ 5 (Debian/Ubuntu: \
                                  apt-get install redis-server redis-tools), or point \
                                  RUNSTATE_REDIS_CLUSTER_URL at a cluster \
                                  (redis+cluster://host:port,host:port/)";

/// A 3-primary, 3-replica Redis Cluster on free loopback ports, its files
/// under `target/services/redis-cluster/<port>/` (nothing kept on disk but
/// each node's cluster config). Started daemonized with a pidfile per node;
/// stopped by those PIDs ([`RedisCluster::stop`], or on drop when started
/// for one test run). `services up` leaves it running and records its URL in
/// `target/services/redis-cluster/url`, where `test` finds it again.
pub(crate) struct RedisCluster {
    ports: Vec<u16>,
    /// Whether dropping it stops it (started for this run only).
    owned: bool,
}

fn cluster_dir() -> std::path::PathBuf {
    crate::root().join("target/services/redis-cluster")
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("redis-cluster: no free port: {e}"))
}

/// `redis-cli -p PORT ARGS…`, its output.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

impl RedisCluster {
    /// The cluster `services up` left running, if every node still answers
    /// and the cluster is healthy.
    pub(crate) fn running() -> Option<RedisCluster> {
        let text = std::fs::read_to_string(cluster_dir().join("ports")).ok()?;
        let ports: Vec<u16> = text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let cluster = RedisCluster {
            ports,
            owned: false,
        };
        (cluster.ports.len() == 6 && cluster.healthy()).then_some(cluster)
    }

    fn healthy(&self) -> bool {
        self.ports.iter().all(|port| {
            redis_cli(*port, &["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
        })
    }

    /// Starts six nodes and joins them into a cluster (three primaries,
    /// each with one replica), waiting until every node reports
    /// `cluster_state:ok`. `owned`: stop it when dropped.
    pub(crate) fn start(owned: bool) -> Result<RedisCluster, String> {
        for program in ["redis-server", "redis-cli"] {
            if !installed(program) {
                return Err(format!(
                    "redis-cluster: `{program}` is not installed: {REDIS_CLUSTER_HINT}"
                ));
            }
        }
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            owned: true,
        };
        for _ in 0..6 {
            let port = free_port()?;
            let dir = cluster_dir().join(port.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("redis-cluster: {e}"))?;
            let status = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
                .arg("--dir")
                .arg(&dir)
                .args(["--logfile", "redis.log"])
                .arg("--pidfile")
                .arg(dir.join("redis.pid"))
                .status()
                .map_err(|e| format!("redis-cluster: could not run redis-server: {e}"))?;
            if !status.success() {
                return Err(format!("redis-cluster: redis-server exited with {status}"));
            }
            cluster.ports.push(port);
        }
        for port in &cluster.ports {
            let mut waited = 0;
            while redis_cli(*port, &["PING"]).is_none_or(|r| !r.contains("PONG")) {
                std::thread::sleep(Duration::from_millis(50));
                waited += 1;
                if waited > 200 {
                    return Err(format!("redis-cluster: node {port} does not answer"));
                }
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("redis-cluster: could not run redis-cli: {e}"))?;
        if !created.success() {
            return Err(format!(
                "redis-cluster: `redis-cli --cluster create` failed ({created})"
            ));
        }
        let mut waited = 0;
        while !cluster.healthy() {
            std::thread::sleep(Duration::from_millis(100));
            waited += 1;
            if waited > 300 {
                return Err("redis-cluster: cluster_state did not become ok within 30 s".to_owned());
            }
        }
        let ports: Vec<String> = cluster.ports.iter().map(u16::to_string).collect();
        std::fs::write(cluster_dir().join("ports"), ports.join(" "))
            .map_err(|e| format!("redis-cluster: {e}"))?;
        eprintln!(
            "redis-cluster: 3 primaries, 3 replicas on {}",
            nodes.join(",")
        );
        cluster.owned = owned;
        Ok(cluster)
    }

    /// The URL the tests get.
    pub(crate) fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}/", nodes.join(","))
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![(REDIS_CLUSTER_VAR.to_owned(), self.url())]
    }

    /// Stops every node by the PID in its pidfile.
    pub(crate) fn stop(&mut self) {
        for port in self.ports.drain(..) {
            let pidfile = cluster_dir().join(port.to_string()).join("redis.pid");
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
                // Gone (or 5 s passed) before its folder is removed.
                for _ in 0..100 {
                    let alive = std::process::Command::new("kill")
                        .args(["-0", &pid.to_string()])
                        .stderr(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if !alive {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = std::fs::remove_dir_all(cluster_dir().join(port.to_string()));
        }
        let _ = std::fs::remove_file(cluster_dir().join("ports"));
    }

    /// For `services down`: stops the cluster `services up` left running.
    pub(crate) fn stop_recorded() -> bool {
        let Ok(text) = std::fs::read_to_string(cluster_dir().join("ports")) else {
            return false;
        };
        let mut cluster = RedisCluster {
            ports: text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            owned: false,
        };
        cluster.stop();
        true
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if self.owned {
            eprintln!("redis-cluster: stopping {} nodes by PID", self.ports.len());
            self.stop();
        }
    }
}
