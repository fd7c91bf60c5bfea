//! A private Redis Cluster for the failover test: six redis-server
//! processes (three primaries, one replica each) on free loopback ports,
//! their files under target/, joined by `redis-cli --cluster create`, each
//! stopped by its PID (SIGKILL) when dropped or killed.

use std::time::{Duration, Instant};

use super::OwnRedis;

pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
}

impl OwnCluster {
    /// Starts the nodes with `cluster-node-timeout` `node_timeout_ms` and
    /// waits until every node reports `cluster_state:ok` and every replica
    /// is in sync with its primary.
    pub fn start(node_timeout_ms: u64) -> OwnCluster {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<OwnRedis> = (0..6)
            .map(|_| {
                OwnRedis::start(
                    false,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        &timeout,
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli is installed (Debian: apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = OwnCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        // Replicas in sync: each reports its link to the primary up, and
        // each primary streams to its replica. A replica's link is up once
        // it loaded the primary's snapshot, before its first
        // acknowledgement reaches the primary, which only then starts
        // streaming writes (`state=online`): a write made in between
        // reaches the replica later, and none did when the primary was
        // killed in that window (the walk test found 19 of 30 runs, its
        // new primary at replication offset 0).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = cluster.nodes.iter().all(|n| {
                let info = n.command(&["INFO", "replication"]);
                if info.contains("role:master") {
                    info.contains("connected_slaves:1") && info.contains("state=online")
                } else {
                    info.contains("master_link_status:up")
                }
            });
            if synced {
                break;
            }
            assert!(Instant::now() < deadline, "replicas did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Waits until every node still running reports `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self
                .live()
                .all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "cluster_state did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn live(&self) -> impl Iterator<Item = &OwnRedis> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// The `redis+cluster://` URL through every node.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}/", addrs.join(","))
    }

    /// The `redis+cluster://` URL with node `first` as the first seed
    /// (where the store's listener subscribes).
    pub fn url_first(&self, first: usize) -> String {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.retain(|i| *i != first);
        order.insert(0, first);
        let addrs: Vec<String> = order
            .iter()
            .map(|i| format!("127.0.0.1:{}", self.nodes[*i].port))
            .collect();
        format!("redis+cluster://{}/", addrs.join(","))
    }

    /// The index of the running primary serving `key` (the one node that
    /// answers `EXISTS key` instead of redirecting), if any.
    pub fn primary_of(&self, key: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.is_running() && n.command(&["EXISTS", key]).starts_with(':'))
    }

    /// The index of the replica of node `primary`.
    pub fn replica_of(&self, primary: usize) -> usize {
        let port = format!("master_port:{}\r\n", self.nodes[primary].port);
        self.nodes
            .iter()
            .position(|n| n.is_running() && n.command(&["INFO", "replication"]).contains(&port))
            .expect("every primary has a replica")
    }

    /// Waits until a running node serves `key` again (a replica was
    /// promoted) and every running node reports `cluster_state:ok`.
    pub fn wait_failover(&self, key: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.primary_of(key).is_none() {
            assert!(Instant::now() < deadline, "no replica took over");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(deadline.saturating_duration_since(Instant::now()));
    }

    /// Starts node `index` again (same port and cluster config: it rejoins
    /// as a replica of the node that took over) and waits until it is in
    /// sync.
    pub fn restart_as_replica(&mut self, index: usize, within: Duration) {
        self.nodes[index].start_again();
        let deadline = Instant::now() + within;
        while !self.nodes[index]
            .command(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the old primary did not rejoin");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
