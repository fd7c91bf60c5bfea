//! Tests of a write sent twice, as the cluster client sends one again when
//! its connection dropped before the reply (it cannot tell whether the
//! server ran it).

use std::time::Duration;

use runstate_core::{Bytes, DocName, Lock, Owner, PutMode, RunId, Store};

use crate::writes::{Write, new_version};
use crate::{RedisConfig, RedisStore};

/// The same write (one version) sent twice through the client answers
/// with its version both times, for a create, an update and a
/// save-and-release; before, the second send failed (`AlreadyExists`,
/// `Precondition`, `Fenced`) although the write had been made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_twice_succeeds_twice() {
    let Some(url) =
        runstate_conformance::server_url("redis", "RUNSTATE_REDIS_URL", "a Redis resend test")
    else {
        return;
    };
    let prefix = format!("rsresend:{:012x}", fastrand::u64(..) >> 16);
    let config = RedisConfig::from_url(&url)
        .expect("url")
        .with_prefix(prefix)
        .expect("prefix");
    let store = RedisStore::open(config).await.expect("open");
    let run = RunId::new("r").expect("valid");
    let doc = DocName::new("d").expect("valid");
    let send_twice = async |write: &Write<'_>| {
        let mut answers = Vec::new();
        for _ in 0..2 {
            let mut answered = false;
            answers.push(
                store
                    .inner
                    .put_once(write, &mut answered)
                    .await
                    .map_err(|e| e.kind()),
            );
        }
        answers
    };

    let bytes = Bytes::from_static(b"created");
    let created = new_version();
    let create = Write {
        run: &run,
        doc: &doc,
        bytes: &bytes,
        mode: &PutMode::Create,
        lease: None,
        foreign: None,
        release: false,
        version: created.clone(),
    };
    let answers = send_twice(&create).await;
    assert_eq!(answers, [Ok(created.clone()), Ok(created.clone())]);

    let bytes = Bytes::from_static(b"updated");
    let updated = new_version();
    let update = Write {
        mode: &PutMode::Update(created.clone()),
        bytes: &bytes,
        version: updated.clone(),
        ..create
    };
    let answers = send_twice(&update).await;
    assert_eq!(answers, [Ok(updated.clone()), Ok(updated.clone())]);

    let key = runstate_core::LockKey::Doc(run.clone(), doc.clone());
    let lease = store
        .try_acquire(&key, &Owner::for_this_process(), Duration::from_secs(30))
        .await
        .expect("acquire");
    let bytes = Bytes::from_static(b"saved");
    let saved = new_version();
    let save = Write {
        mode: &PutMode::Update(updated.clone()),
        bytes: &bytes,
        lease: Some(&lease),
        release: true,
        version: saved.clone(),
        ..create
    };
    let answers = send_twice(&save).await;
    assert_eq!(answers, [Ok(saved.clone()), Ok(saved.clone())]);
    assert!(
        store.inspect(&key).await.expect("inspect").is_none(),
        "released by the first send"
    );
    let stored = store
        .get(&run, &doc, runstate_core::GetOptions::new())
        .await
        .expect("get")
        .expect("there");
    assert_eq!((stored.version, stored.bytes), (saved, bytes));
    store.purge_prefix().await.expect("cleanup");
}

/// Versions are unique to a write on a host whatever the random half does
/// (a forked child repeats its parent's random numbers): each carries the
/// process id and a count of this process's versions.
#[test]
fn versions_carry_the_process_and_a_count() {
    let (a, b) = (new_version(), new_version());
    let pid = format!("{:08x}", std::process::id());
    for v in [&a, &b] {
        assert_eq!(v.as_str().len(), 32);
        assert_eq!(&v.as_str()[16..24], pid, "{v}");
    }
    let count =
        |v: &runstate_core::Version| u32::from_str_radix(&v.as_str()[24..], 16).expect("hex");
    assert_ne!(count(&a), count(&b), "the count moves on");
}
