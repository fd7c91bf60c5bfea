//! Fault tests on a private PostgreSQL server: connections killed with
//! `pg_terminate_backend` and a server restarted in the middle of locked
//! updates, and under a store's listening connection.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_conformance::faults;
use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutOptions, Replay, RunId, StatusEvent, Store,
    StoreExt, WatchEvent,
};
use runstate_sql::{SqlConfig, SqlStore};
use support::OwnPostgres;

fn own_server() -> Option<OwnPostgres> {
    match OwnPostgres::start() {
        Some(server) => Some(server),
        None if runstate_conformance::is_required("postgres") => {
            panic!(
                "backend `postgres` is required but PostgreSQL (initdb, pg_ctl) is not installed"
            )
        }
        None => {
            eprintln!("*** SKIPPED: PostgreSQL binaries are not installed ***");
            None
        }
    }
}

async fn store(server: &OwnPostgres, max_connections: u32) -> SqlStore {
    let config = SqlConfig::from_url(&server.url())
        .expect("url")
        .with_timeout(Duration::from_secs(2))
        .with_acquire_timeout(Duration::from_secs(2))
        .with_max_connections(max_connections);
    SqlStore::open(config).await.expect("open")
}

fn kill_client_connections(server: &OwnPostgres) -> usize {
    let killed = server.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    );
    killed.parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_outlives_the_connection_that_took_it() {
    let Some(server) = own_server() else { return };
    let holder = store(&server, 1).await;
    let other = store(&server, 1).await;
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("ron").expect("valid"),
    );
    let key = LockKey::Doc(run.clone(), doc.clone());
    let (a, b) = (Owner::for_this_process(), Owner::for_this_process());
    let ttl = Duration::from_secs(3);
    let started = Instant::now();
    let lease = holder.try_acquire(&key, &a, ttl).await.expect("A acquires");

    // Kill every client connection, the one that just granted the lease included.
    assert!(
        kill_client_connections(&server) >= 1,
        "the holder's connection was killed"
    );

    // The lease is a row, not a session lock: it is still honoured.
    let mut reconnect_errors = 0;
    let error = loop {
        match other.try_acquire(&key, &b, ttl).await {
            Err(e) if e.kind() == ErrorKind::Locked => break e,
            Err(e) if e.is_retryable() && reconnect_errors < 3 => reconnect_errors += 1,
            other => panic!("expected Locked, got {other:?}"),
        }
    };
    assert_eq!(error.holder().expect("holder").owner, a);
    // The holder's next calls reconnect by themselves and its lease works.
    let mut saved = holder
        .put(
            &run,
            &doc,
            Bytes::from_static(b"A"),
            PutOptions::overwrite().with_lease(&lease),
        )
        .await;
    if saved.as_ref().is_err_and(|e| e.is_retryable()) {
        saved = holder
            .put(
                &run,
                &doc,
                Bytes::from_static(b"A"),
                PutOptions::overwrite().with_lease(&lease),
            )
            .await;
    }
    saved.expect("the holder's fenced save after reconnecting");
    assert!(started.elapsed() < ttl, "checked within the TTL");

    // After the TTL, and not before, B takes it over.
    tokio::time::sleep_until((started + ttl + Duration::from_millis(300)).into()).await;
    let lease_b = other
        .try_acquire(&key, &b, ttl)
        .await
        .expect("B after the TTL");
    assert!(lease_b.fence() > lease.fence());
    assert_eq!(
        holder
            .put(
                &run,
                &doc,
                Bytes::from_static(b"stale"),
                PutOptions::overwrite().with_lease(&lease)
            )
            .await
            .expect_err("stale")
            .kind(),
        ErrorKind::Fenced
    );
    eprintln!("errors while reconnecting: {reconnect_errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_restart_mid_run_then_recovery() {
    let Some(server) = own_server() else { return };
    let store = store(&server, 4).await;
    let (run, doc) = (
        RunId::new("probe").expect("valid"),
        DocName::new("d").expect("valid"),
    );
    let outage_errors = std::sync::Mutex::new(Vec::new());
    let (acked, errors) =
        faults::increments_through_faults(Arc::new(store.clone()), 120, &[40, 80], || {
            server.stop_immediate();
            let (store, run, doc, server, outage_errors) = (
                store.clone(),
                run.clone(),
                doc.clone(),
                &server,
                &outage_errors,
            );
            async move {
                for _ in 0..2 {
                    let error = store
                        .get_bytes(&run, &doc)
                        .await
                        .expect_err("the server is down");
                    outage_errors.lock().expect("lock").push(error);
                }
                server.start_again();
            }
        })
        .await;
    let outage_errors = outage_errors.into_inner().expect("lock");
    assert_eq!(acked, 120);
    assert_eq!(outage_errors.len(), 4);
    faults::assert_clear_and_retryable(&outage_errors, "postgres");
    faults::assert_clear_and_retryable(&errors, "postgres");
    eprintln!(
        "restarts: 2, acknowledged: {acked}, errors while down: 4, errors of updates: {}",
        errors.len()
    );
    store
        .put_bytes(&run, &doc, Bytes::from_static(b"after"))
        .await
        .expect("later calls succeed");
}

/// The next watch event within `bound`, or a panic saying what came.
async fn next_event(watch: &mut runstate_core::Watcher, bound: Duration) -> WatchEvent {
    match tokio::time::timeout(bound, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("no watch event within {bound:?}: {other:?}"),
    }
}

async fn next_message(sub: &mut runstate_core::Subscription, bound: Duration) -> StatusEvent {
    match tokio::time::timeout(bound, sub.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("no status event within {bound:?}: {other:?}"),
    }
}

/// Reads events until a `Resync`, then re-lists (the protocol), and
/// returns the listing's version of `doc`.
async fn until_resync(
    watch: &mut runstate_core::Watcher,
    store: &SqlStore,
    run: &RunId,
    doc: &DocName,
) -> Option<runstate_core::Version> {
    loop {
        if next_event(watch, Duration::from_secs(30)).await == WatchEvent::Resync {
            // A pooled connection broken by the fault fails one call.
            let mut tries = 0;
            let listed = loop {
                match store.list_all_docs(run).await {
                    Ok(listed) => break listed,
                    Err(e) if e.is_retryable() && tries < 5 => tries += 1,
                    Err(e) => panic!("re-list: {e}"),
                }
            };
            return listed
                .into_iter()
                .find(|m| m.name == *doc)
                .map(|m| m.version);
        }
    }
}

/// Issue 13 §1: the listening connection is killed
/// (`pg_terminate_backend`), then the server restarts: each time the
/// watch says `Resync` (changes made meanwhile were announced to nobody),
/// a re-list has them, and events flow again afterwards; a status
/// subscription loses no message (they are rows, read again from where it
/// was), and a waiter is woken again by releases made elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listener_reconnects_with_resync() {
    let Some(server) = own_server() else { return };
    let other = store(&server, 2).await;
    let store = store(&server, 4).await;
    let (run, doc) = (
        RunId::new("r").expect("valid"),
        DocName::new("climate").expect("valid"),
    );
    let mut watch = store.watch(&run).await.expect("watch");
    let mut status = store
        .subscribe(&run, Replay::None)
        .await
        .expect("subscribe");
    let v1 = store
        .put_bytes(&run, &doc, Bytes::from_static(b"1"))
        .await
        .expect("put");
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(5)).await,
        WatchEvent::Changed {
            doc: doc.clone(),
            version: v1
        }
    );
    for fault in ["kill the listener", "restart the server"] {
        if fault == "kill the listener" {
            let killed = server.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE 'LISTEN%'",
            );
            assert_eq!(killed, "1", "the listening connection was killed");
        } else {
            server.stop_immediate();
            server.start_again();
        }
        // Written (through the other store, which retries its broken
        // connection) while the listener may be reconnecting.
        let mut written = None;
        for _ in 0..5 {
            match other
                .put_bytes(&run, &doc, Bytes::from(fault.to_owned()))
                .await
            {
                Ok(v) => {
                    written = Some(v);
                    break;
                }
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("{fault}: {e}"),
            }
        }
        let written = written.expect("written after the fault");
        let mut published = false;
        for _ in 0..5 {
            match other.publish(&run, "wepp", fault).await {
                Ok(()) => {
                    published = true;
                    break;
                }
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("{fault}: {e}"),
            }
        }
        assert!(published, "{fault}: published");
        let listed = until_resync(&mut watch, &store, &run, &doc).await;
        // The write may also come as an event, before or after the
        // marker: either way the follower knows it.
        assert_eq!(listed, Some(written), "{fault}: the re-list has the write");
        match next_message(&mut status, Duration::from_secs(30)).await {
            StatusEvent::Message(m) => assert_eq!(m.text, fault, "{fault}: no message lost"),
            other => panic!("{fault}: {other:?}"),
        }
        // Events flow again.
        let after = other
            .put_bytes(&run, &doc, Bytes::from_static(b"after"))
            .await
            .expect("put");
        loop {
            match next_event(&mut watch, Duration::from_secs(10)).await {
                WatchEvent::Changed { version, .. } if version == after => break,
                WatchEvent::Changed { .. } | WatchEvent::Resync => {}
                event => panic!("{fault}: {event:?}"),
            }
        }
        // A waiter here is woken by a release there.
        let key = LockKey::Doc(run.clone(), doc.clone());
        let lease = other
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(60))
            .await
            .expect("acquire");
        let waiting = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                store.wait_for_release(&key, Duration::from_secs(30)).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.release(&lease).await.expect("release");
        let waited = waiting.await.expect("joined");
        assert!(
            waited < Duration::from_secs(10),
            "{fault}: the waiter was woken ({waited:?})"
        );
    }
}
