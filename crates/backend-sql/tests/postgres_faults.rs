//! Fault tests on a private PostgreSQL server: connections killed with
//! `pg_terminate_backend` and a server restarted in the middle of locked
//! updates.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runstate_conformance::faults;
use runstate_core::{
    Bytes, DocName, ErrorKind, Lock, LockKey, Owner, PutOptions, RunId, Store, StoreExt,
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
