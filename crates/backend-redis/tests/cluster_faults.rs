//! The Redis backend on Redis Clusters of the tests' own (started on free
//! loopback ports, stopped by PID): a primary killed during locked
//! increments, and replies lost at a proxy in front of every node. They run
//! only when `RUNSTATE_REDIS_CLUSTER_URL` is set (as `cargo xtask test`
//! does), like the suite in `tests/cluster.rs`, and in their own test
//! binary: cargo runs test binaries one after another, so the suite's timed
//! cases (a 0.6 s lease renewed under a blocked thread) never share the
//! machine with a cluster being killed or a replica kept busy by a script.
//! Every test is named `cluster::…` (`cargo xtask test --backend
//! redis-cluster` selects them by that).

mod support;

mod cluster {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use runstate_core::{
        Bytes, DocName, ErrorKind, GetOptions, Lock, LockKey, Owner, PutMode, RunId, Store,
        WatchEvent,
    };
    use runstate_redis::RedisStore;

    use runstate_conformance::proxy::{Proxy, ReplyFault};

    use crate::support::OwnRedis;
    use crate::support::cluster::OwnCluster;

    /// The variable that turns these tests on (its cluster is not used).
    const URL_VAR: &str = "RUNSTATE_REDIS_CLUSTER_URL";
    /// The backend's name in `RUNSTATE_REQUIRE_BACKENDS`.
    const BACKEND: &str = "redis-cluster";

    /// The counter document's key in the failover test's cluster.
    const COUNTER_KEY: &str = "failover:{counter}:doc:count";

    /// What one failover round measured.
    #[derive(Debug)]
    struct Round {
        acknowledged: usize,
        lost: usize,
        fences_increasing: bool,
        failed_calls: usize,
        /// `Resync`s the watcher subscribed through the killed node got.
        resyncs: usize,
        /// Writes it reported after its last `Resync`.
        seen_after: usize,
    }

    /// One entry of the counter document: which task, its sequence number,
    /// the fence of the lease it was written under.
    type Entry = (u32, u64, u64);

    /// Locked increments from several tasks on a private cluster; the
    /// primary holding the counter's slot is killed (SIGKILL by PID) half
    /// way and its replica takes over. Each increment appends (task, seq,
    /// fence) to the document, so a lost acknowledged update shows as a
    /// missing entry, and the fences must grow along the list.
    async fn failover_round(wait_replicas: u64) -> Round {
        let cluster = OwnCluster::start(1000);
        let url = format!(
            "{}?prefix=failover&timeout_ms=3000&wait_replicas={wait_replicas}&wait_timeout_ms=1000",
            cluster.url()
        );
        let store = Arc::new(RedisStore::connect(&url).await.expect("open the cluster"));
        let run = RunId::new("counter").expect("run");
        let doc = DocName::new("count").expect("doc");
        let key = LockKey::Doc(run.clone(), doc.clone());
        let victim = cluster
            .primary_of(COUNTER_KEY)
            .expect("a primary serves the counter");
        // A watcher whose listener subscribes through the node about to be
        // killed: it must report `Resync` and then carry on.
        let watch_store = RedisStore::connect(&format!(
            "{}?prefix=failover&timeout_ms=3000",
            cluster.url_first(victim)
        ))
        .await
        .expect("open the watching store");
        let mut watcher = runstate_core::Store::watch(&watch_store, &run)
            .await
            .expect("watch");
        let stop = Arc::new(AtomicBool::new(false));
        let watching = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                // (resyncs, changes after the last resync)
                let (mut resyncs, mut after) = (0usize, 0usize);
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(100), watcher.next()).await {
                        Ok(Some(Ok(WatchEvent::Resync))) => {
                            resyncs += 1;
                            after = 0;
                        }
                        Ok(Some(Ok(_))) => after += 1,
                        Ok(Some(Err(e))) => panic!("the watcher failed: {e}"),
                        Ok(None) => panic!("the watcher ended"),
                        Err(_) => {}
                    }
                }
                (resyncs, after)
            })
        };
        let mut tasks = Vec::new();
        for task in 0..4u32 {
            let (store, doc, key, stop) = (
                Arc::clone(&store),
                doc.clone(),
                key.clone(),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                let owner = Owner::new("failover-test", std::process::id(), format!("task{task}"))
                    .expect("owner");
                let mut acked: Vec<(u32, u64)> = Vec::new();
                let mut failed = 0usize;
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let step = async {
                        let (lease, loaded) = store
                            .acquire_and_load(
                                &key,
                                &doc,
                                &owner,
                                Duration::from_secs(3),
                                GetOptions::default(),
                            )
                            .await?;
                        let mut entries: Vec<Entry> = match &loaded {
                            Some(stored) => serde_json::from_slice(&stored.bytes)
                                .expect("the counter document is JSON"),
                            None => Vec::new(),
                        };
                        entries.push((task, seq, lease.fence().0));
                        let bytes = Bytes::from(serde_json::to_vec(&entries).expect("json"));
                        let mode = match &loaded {
                            Some(stored) => PutMode::Update(stored.version.clone()),
                            None => PutMode::Create,
                        };
                        store.save_and_release(&lease, &doc, bytes, mode).await
                    };
                    match step.await {
                        Ok(_) => {
                            acked.push((task, seq));
                            seq += 1;
                        }
                        Err(e) if e.kind() == ErrorKind::Locked => {
                            let wait = e
                                .expires_in()
                                .unwrap_or_default()
                                .min(Duration::from_millis(20));
                            store.wait_for_release(&key, wait).await;
                        }
                        // The same entry again: written or not, it counts once.
                        Err(_) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, failed)
            }));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // The replica falls behind: stopped (SIGSTOP by its PID, for less
        // than the node timeout, so nobody marks it failed) and its link
        // cut by the primary (`CLIENT KILL TYPE replica`: what was already
        // sent is in the stopped replica's socket, nothing more will be).
        // The primary acknowledges writes it alone has, then dies
        // (SIGKILL), and the replica, resumed, takes over: what the primary
        // acknowledged meanwhile is what async replication loses, and what
        // WAIT must not acknowledge.
        let mut cluster = cluster;
        let replica = cluster.replica_of(victim);
        cluster.nodes[replica].signal("STOP");
        let cut = cluster.nodes[victim].command(&["CLIENT", "KILL", "TYPE", "replica"]);
        assert!(cut.starts_with(":1"), "the replica's link was cut: {cut:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        cluster.nodes[victim].kill();
        cluster.nodes[replica].signal("CONT");
        let killed_at = Instant::now();
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.wait_failover(COUNTER_KEY, Duration::from_secs(30));
            let took_over = killed_at.elapsed();
            // The old primary comes back as the new primary's replica, so
            // WAIT can be satisfied again.
            cluster.restart_as_replica(victim, Duration::from_secs(30));
            eprintln!(
                "failover: replica took over {took_over:?} after the kill, old primary back as replica {:?} after it",
                killed_at.elapsed()
            );
            cluster
        })
        .await
        .expect("the cluster recovers");
        // Increments go on after the failover for a while.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        let (resyncs, seen_after) = watching.await.expect("watcher task");
        let mut acked = Vec::new();
        let mut failed_calls = 0;
        for task in tasks {
            let (mine, failed) = task.await.expect("task");
            acked.extend(mine);
            failed_calls += failed;
        }
        let stored = loop {
            match runstate_core::Store::get(&*store, &run, &doc, GetOptions::default()).await {
                Ok(stored) => break stored.expect("the counter exists"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let entries: Vec<Entry> = serde_json::from_slice(&stored.bytes).expect("json");
        let present: HashSet<(u32, u64)> = entries.iter().map(|(t, s, _)| (*t, *s)).collect();
        let lost = acked.iter().filter(|a| !present.contains(a)).count();
        let fences_increasing = entries.windows(2).all(|w| w[0].2 < w[1].2);
        drop(cluster);
        Round {
            acknowledged: acked.len(),
            lost,
            fences_increasing,
            failed_calls,
            resyncs,
            seen_after,
        }
    }

    /// Issue 16: a primary killed during locked increments, its replica
    /// promoted. Reports how many acknowledged updates were lost without
    /// and with `wait_replicas=1` (with it: none may be), and checks the
    /// fences kept increasing in both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failover_with_wait_replicas_loses_no_acknowledged_update() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the failover test").is_none() {
            return;
        }
        let without = failover_round(0).await;
        eprintln!("failover without wait_replicas: {without:?}");
        let with = failover_round(1).await;
        eprintln!("failover with wait_replicas=1: {with:?}");
        println!(
            "FAILOVER REPORT: without WAIT {} of {} acknowledged updates lost, fences increasing: {}, \
             {} failed calls retried; with wait_replicas=1 {} of {} lost, fences increasing: {}, \
             {} failed calls retried",
            without.lost,
            without.acknowledged,
            without.fences_increasing,
            without.failed_calls,
            with.lost,
            with.acknowledged,
            with.fences_increasing,
            with.failed_calls
        );
        assert!(with.acknowledged > 0 && without.acknowledged > 0);
        assert_eq!(
            with.lost, 0,
            "with wait_replicas=1 no acknowledged update may be lost"
        );
        assert!(without.fences_increasing && with.fences_increasing);
        for round in [&without, &with] {
            assert!(
                round.resyncs > 0 && round.seen_after > 0,
                "the listener's node died: Resync, then the writes after it ({round:?})"
            );
        }
    }

    /// Waits until every node of `cluster` names each node at its proxy
    /// (`proxies[i]` in front of node `i`) in `CLUSTER SLOTS`, and at no
    /// real port.
    async fn wait_announced(cluster: &OwnCluster, proxies: &[Proxy]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            let mut con = redis::Client::open(node.url())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            loop {
                let slots: redis::Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut con)
                    .await
                    .expect("CLUSTER SLOTS");
                let seen = format!("{slots:?}");
                let real = cluster
                    .nodes
                    .iter()
                    .any(|n| seen.contains(&format!("int({})", n.port)));
                let proxied = proxies
                    .iter()
                    .all(|p| seen.contains(&format!("int({})", p.addr().port())));
                if proxied && !real {
                    break;
                }
                assert!(Instant::now() < deadline, "announced ports: {seen}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// A cluster of its own with each node announced at a proxy in front
    /// of it, so every connection of a client passes through one, and a
    /// store opened on it through the proxies with the URL options
    /// `options`.
    async fn proxied_cluster(options: &str) -> (OwnCluster, Vec<Proxy>, RedisStore) {
        let cluster = OwnCluster::start(5000);
        let mut proxies = Vec::new();
        for node in &cluster.nodes {
            let proxy = Proxy::start(node.addr()).await;
            let port = proxy.addr().port().to_string();
            let bus = (u32::from(node.port) + 10000).to_string();
            for (option, value) in [
                ("cluster-announce-bus-port", bus.as_str()),
                ("cluster-announce-port", port.as_str()),
            ] {
                let reply = node.command(&["CONFIG", "SET", option, value]);
                assert!(reply.starts_with("+OK"), "CONFIG SET {option}: {reply}");
            }
            proxies.push(proxy);
        }
        wait_announced(&cluster, &proxies).await;
        // Announced anew, each replica reconnects to its primary (through
        // the primary's proxy): wait for every link to be up again.
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            loop {
                let info = node.command(&["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "replication link: {info}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let seeds: Vec<String> = proxies
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.addr().port()))
            .collect();
        let store = RedisStore::connect(&format!("redis+cluster://{}/?{options}", seeds.join(",")))
            .await
            .expect("open the cluster through the proxies");
        (cluster, proxies, store)
    }

    /// With `wait_replicas`, a save or a grant whose `WAIT` reply the
    /// network lost is not reported replicated while no replica has it.
    /// The cluster client sends the request again on a new connection. A
    /// `WAIT` that is the first command of a connection answers at once
    /// with every connected replica (measured on Redis 7.0: a command in
    /// front of it on that connection, read-only or not, makes it wait),
    /// so the `WAIT` goes in one request with its write, and a request
    /// sent again carries the write again. The fault matches only such a
    /// request, so the test also fails for a `WAIT` sent on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_wait_reply_acknowledges_no_unreplicated_write() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the lost-WAIT test").is_none() {
            return;
        }
        let (cluster, proxies, store) =
            proxied_cluster("prefix=wait&timeout_ms=5000&wait_replicas=1&wait_timeout_ms=300")
                .await;
        let run = RunId::new("r").expect("run");
        let doc = DocName::new("d").expect("doc");
        let created = store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"one"),
                runstate_core::PutOptions::create(),
            )
            .await
            .expect("a write its running replica acknowledged");
        let victim = cluster
            .primary_of("wait:{r}:doc:d")
            .expect("a primary serves the document");
        let primary = &proxies[victim];
        // Its replica follows it through its proxy.
        let follows = format!("master_port:{}\r\n", primary.addr().port());
        let replica = cluster
            .nodes
            .iter()
            .position(|n| n.command(&["INFO", "replication"]).contains(&follows))
            .expect("the primary has a replica");
        // The replica stops acknowledging but stays connected (so a WAIT
        // with nothing to wait for still counts it) and answers: a
        // read-only script that never ends keeps it busy (its primary's
        // stream waits; other clients get `BUSY` at once) until `SCRIPT
        // KILL`. A stopped replica would not answer, and the cluster
        // client's reconnection, which asks the nodes for the slots, would
        // wait for it. Each WAIT's reply is then lost once.
        let reply =
            cluster.nodes[replica].command(&["CONFIG", "SET", "busy-reply-threshold", "10"]);
        assert!(reply.starts_with("+OK"), "busy-reply-threshold: {reply}");
        let mut spinning =
            std::net::TcpStream::connect(cluster.nodes[replica].addr()).expect("connect");
        std::io::Write::write_all(
            &mut spinning,
            b"*3\r\n$4\r\nEVAL\r\n$17\r\nwhile true do end\r\n$1\r\n0\r\n",
        )
        .expect("send the script");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Only a request that carries the write and its WAIT together
        // matches (a WAIT sent on its own would not, and the count below
        // would fail).
        let lose_the_wait_reply = || {
            primary.arm(ReplyFault::drop_when(|request: &[u8]| {
                let has = |word: &[u8]| request.windows(word.len()).any(|w| w == word);
                has(b"WAIT") && has(b"EVALSHA")
            }));
        };
        let fired = primary.fired();
        lose_the_wait_reply();
        let saved = store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"two"),
                runstate_core::PutOptions::update(created),
            )
            .await;
        let after_save = primary.fired();
        lose_the_wait_reply();
        let key = LockKey::Doc(run.clone(), doc.clone());
        let granted = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await;
        let after_grant = primary.fired();
        let killed = cluster.nodes[replica].command(&["SCRIPT", "KILL"]);
        assert!(killed.starts_with("+OK"), "SCRIPT KILL: {killed}");
        drop(spinning);
        assert_eq!(
            (after_save, after_grant),
            (fired + 1, fired + 2),
            "each WAIT's reply was lost"
        );
        for (what, outcome) in [
            ("a save", saved.map(|_| ())),
            ("a grant", granted.map(|_| ())),
        ] {
            let error = outcome.expect_err(&format!(
                "{what} no replica acknowledged is not reported replicated"
            ));
            assert_eq!(error.kind(), ErrorKind::Backend, "{what}: {error}");
            assert!(error.is_retryable(), "{what}: {error}");
            assert!(
                error.to_string().contains("only 0 of 1 replicas"),
                "{what}: {error}"
            );
        }
    }

    /// A write whose reply the network lost, on a cluster: redis-rs's
    /// cluster client reconnects and sends the transaction again (it
    /// cannot know whether the server ran it). The first send was made,
    /// so the write must be reported made, not failed by its own resend
    /// (before: `AlreadyExists` for a create, `Precondition` for an
    /// update, `Fenced` for a save-and-release whose first run released
    /// the lease). Each node is announced at a proxy in front of it, so
    /// every connection of the client passes through one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_reply_was_lost_is_reported_made() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the lost-reply test").is_none() {
            return;
        }
        let (cluster, proxies, store) = proxied_cluster("prefix=lost&timeout_ms=5000").await;
        let run = RunId::new("r").expect("run");
        let doc = DocName::new("d").expect("doc");
        // The run's announcements, heard on a node directly (a cluster
        // delivers every PUBLISH to every node): each write announced
        // once shows its first send was run and the resend made nothing.
        let mut events = redis::Client::open(cluster.nodes[0].url())
            .expect("client")
            .get_async_pubsub()
            .await
            .expect("pubsub");
        events
            .subscribe("lost:{r}:events")
            .await
            .expect("SUBSCRIBE");
        let primary = &proxies[cluster
            .primary_of("lost:{r}:doc:d")
            .expect("a primary serves the document")];
        // The transaction of a write (MULTI … EXEC): its reply is lost and
        // the connection closed, after the server ran it.
        let lose_a_write_reply = || {
            primary.arm(ReplyFault::drop_when(|request: &[u8]| {
                request.windows(5).any(|w| w == b"MULTI")
            }));
        };
        let fired = primary.fired();

        lose_a_write_reply();
        let created = store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"one"),
                runstate_core::PutOptions::create(),
            )
            .await
            .expect("a create whose reply was lost is made");
        assert_eq!(primary.fired(), fired + 1, "the reply was lost");

        lose_a_write_reply();
        let updated = store
            .put(
                &run,
                &doc,
                Bytes::from_static(b"two"),
                runstate_core::PutOptions::update(created.clone()),
            )
            .await
            .expect("an update whose reply was lost is made");
        assert_eq!(primary.fired(), fired + 2, "the reply was lost");

        let key = LockKey::Doc(run.clone(), doc.clone());
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .expect("acquire");
        lose_a_write_reply();
        let saved = store
            .save_and_release(
                &lease,
                &doc,
                Bytes::from_static(b"three"),
                PutMode::Update(updated.clone()),
            )
            .await
            .expect("a save-and-release whose reply was lost is made");
        assert_eq!(primary.fired(), fired + 3, "the reply was lost");
        assert!(
            store.inspect(&key).await.expect("inspect").is_none(),
            "the lease was released"
        );
        let stored = store
            .get(&run, &doc, GetOptions::new())
            .await
            .expect("get")
            .expect("the document");
        assert_eq!(
            (stored.version.clone(), stored.bytes),
            (saved.clone(), Bytes::from_static(b"three"))
        );
        let mut con = redis::Client::open(cluster.nodes[0].url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: i64 = redis::cmd("PUBLISH")
            .arg("lost:{r}:events")
            .arg("end")
            .query_async(&mut con)
            .await
            .expect("PUBLISH");
        let mut stream = events.on_message();
        let mut heard = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
            });
            let message = tokio::time::timeout(Duration::from_secs(5), next)
                .await
                .expect("announcements arrive")
                .expect("a message");
            let text: String = message.get_payload().expect("text");
            if text == "end" {
                break;
            }
            heard.push(text);
        }
        assert_eq!(
            heard,
            [
                format!("c {created} d"),
                format!("c {updated} d"),
                format!("c {saved} d"),
                format!("r {} d", lease.fence()),
            ],
            "each write announced once, the release once"
        );
    }

    /// A cluster of one node holding every slot (a common development
    /// set-up). A node that never met another announces an empty host
    /// (`:port@bus` in `CLUSTER NODES`, `""` in `CLUSTER SLOTS`); its runs
    /// and locks are listed and its keys purged all the same. Before, the
    /// walk over the primaries read `CLUSTER NODES` and skipped a line
    /// without a host: nothing was listed, and the purge removed nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_of_one_node_lists_its_runs_and_locks() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the one-node test").is_none() {
            return;
        }
        let node = OwnRedis::start(false, &["--cluster-enabled", "yes"]);
        let added = node.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert!(added.starts_with("+OK"), "ADDSLOTSRANGE: {added}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node
            .command(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            assert!(Instant::now() < deadline, "cluster_state did not become ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let nodes = node.command(&["CLUSTER", "NODES"]);
        assert!(
            nodes.contains(&format!(" :{}@", node.port)),
            "the node announces no host: {nodes}"
        );
        let store = RedisStore::connect(&format!(
            "redis+cluster://127.0.0.1:{}/?prefix=one&timeout_ms=5000",
            node.port
        ))
        .await
        .expect("open the one-node cluster");
        let doc = DocName::new("d").expect("doc");
        let runs: Vec<RunId> = ["a", "b", "c"]
            .iter()
            .map(|r| RunId::new(*r).expect("run"))
            .collect();
        for run in &runs {
            store
                .put(
                    run,
                    &doc,
                    Bytes::from_static(b"x"),
                    runstate_core::PutOptions::create(),
                )
                .await
                .expect("put");
        }
        let key = LockKey::Doc(runs[0].clone(), doc.clone());
        let _lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
            .await
            .expect("acquire");
        let page = store.list_runs(None, 10).await.expect("list runs");
        assert_eq!(page.items, runs, "every run listed");
        let locks = store.list_locks(None).await.expect("list locks");
        assert_eq!(locks.len(), 1, "the lock listed: {locks:?}");
        assert!(store.purge_prefix().await.expect("purge") > 0);
        let page = store.list_runs(None, 10).await.expect("list runs");
        assert!(page.items.is_empty(), "purged: {:?}", page.items);
        assert_eq!(node.command(&["DBSIZE"]).trim(), ":0", "no key left");
    }

    /// A cluster of its own (`node_timeout_ms`) and a store on it with the
    /// URL options `options`, holding 30 runs of one document each
    /// (`run00` … `run29`), all listed.
    async fn cluster_with_runs(node_timeout_ms: u64, options: &str) -> (OwnCluster, RedisStore) {
        let cluster = OwnCluster::start(node_timeout_ms);
        let store = RedisStore::connect(&format!("{}?{options}", cluster.url()))
            .await
            .expect("open the cluster");
        let doc = DocName::new("d").expect("doc");
        for i in 0..30 {
            let run = RunId::new(format!("run{i:02}")).expect("run");
            store
                .put(
                    &run,
                    &doc,
                    Bytes::from_static(b"x"),
                    runstate_core::PutOptions::create(),
                )
                .await
                .expect("put");
        }
        let listed = store.list_runs(None, 100).await.expect("list");
        assert_eq!(listed.items.len(), 30, "every run listed");
        (cluster, store)
    }

    /// A primary that died and was not replaced yet (a node timeout of a
    /// minute): a walk over every primary fails, retryable, instead of
    /// reporting the other primaries' runs only. The cluster client sends
    /// a request for a slot whose primary it is not connected to to any
    /// other node, and a node never redirects a keyless `SCAN`, so the walk
    /// checks which node answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_with_a_primary_down_fails_instead_of_listing_part() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the dead-primary test").is_none() {
            return;
        }
        let (mut cluster, store) = cluster_with_runs(60_000, "prefix=down&timeout_ms=3000").await;
        let victim = cluster
            .primary_of("down:{run00}:docs")
            .expect("a primary serves run00");
        cluster.nodes[victim].kill();
        for _ in 0..3 {
            match store.list_runs(None, 100).await {
                Ok(page) => panic!("listed {} of 30 runs with a primary down", page.items.len()),
                Err(error) => assert!(error.is_retryable(), "{error}"),
            }
        }
        let purged = store.purge_prefix().await;
        let error = purged.expect_err("a purge that skipped a primary");
        assert!(error.is_retryable(), "{error}");
    }

    /// After a failover the cluster client has not learnt (it only ever
    /// listed, so no keyed command was redirected), a walk reaches the new
    /// primary: its `SCAN` first lands on some other node (the client is
    /// not connected to the old primary), which it notices, and a keyed
    /// command for the slot makes the client learn the layout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_after_a_failover_lists_every_run() {
        if runstate_conformance::server_url(BACKEND, URL_VAR, "the walk-failover test").is_none() {
            return;
        }
        // Each run's document acknowledged by a replica before the kill:
        // replication is asynchronous, and a run the new primary never
        // received is not the walk's to find.
        let (mut cluster, store) = cluster_with_runs(
            1000,
            "prefix=walk&timeout_ms=5000&wait_replicas=1&wait_timeout_ms=5000",
        )
        .await;
        let key = "walk:{run00}:docs";
        let victim = cluster.primary_of(key).expect("a primary serves run00");
        cluster.nodes[victim].kill();
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.wait_failover(key, Duration::from_secs(30));
            cluster
        })
        .await
        .expect("a replica took over");
        let listed = store
            .list_runs(None, 100)
            .await
            .expect("a walk after the failover");
        assert_eq!(
            listed.items.len(),
            30,
            "every run listed after the failover"
        );
        drop(cluster);
    }
}
