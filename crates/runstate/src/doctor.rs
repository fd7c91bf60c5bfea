//! Probing what a backend honours: conditional writes, leases and fences,
//! tried for real on a scratch run.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use runstate_core::{
    Capabilities, DocName, Error, ErrorKind, Fence, Lease, Lock, LockKey, Operation, Owner,
    PutOptions, Result, RunId, StoreExt,
};
use serde::Serialize;

use crate::open::capability_rows;

/// The run the probe writes to and removes afterwards. Lock bookkeeping of
/// this run (its fence counter) stays, as it does for every deleted run.
pub const SCRATCH_RUN: &str = "runstate-doctor";

/// One probe and whether the backend passed it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was tried.
    pub name: String,
    /// Whether the backend did what the contract says.
    pub passed: bool,
    /// What happened, when it is worth saying.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What `runstate doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// What the backend declares, as `(name, value)` rows.
    pub capabilities: Vec<(String, String)>,
    /// What it actually did.
    pub checks: Vec<Check>,
    /// Median round trip of a small `get`, in microseconds.
    pub get_micros: u64,
    /// Median round trip of a small `put`, in microseconds.
    pub put_micros: u64,
    /// Median round trip of acquire + release of a lease, in microseconds.
    pub lease_micros: u64,
}

impl DoctorReport {
    /// Whether every check passed.
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// Adds a check (for backend-specific probes).
    pub fn push_check(&mut self, name: impl Into<String>, passed: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            passed,
            detail: detail.into(),
        });
    }
}

/// How many timed round trips each latency figure is the median of.
const SAMPLES: usize = 7;

/// Probes `store` on the scratch run [`SCRATCH_RUN`] (refused when it holds
/// any document, then claimed with a create-only write of its one document,
/// so an existing run of that name is refused, never touched): a round
/// trip, a
/// create-only write of an existing document, updates with a stale and the
/// current version, a conditional delete, a lease held against a second
/// owner, fences across grants, a save under a superseded lease, and the
/// listing; then it releases its leases and deletes its document, and the
/// run with it unless another document appeared there meanwhile (which is
/// left as it is).
///
/// # Errors
/// [`ErrorKind::AlreadyExists`] when the scratch run exists; a backend
/// failure that stops the probe itself (an unreachable server, a timeout).
/// A contract the backend breaks is a failed [`Check`], not an error.
pub async fn probe(store: &dyn Lock) -> Result<DoctorReport> {
    let run = RunId::new(SCRATCH_RUN)?;
    let doc = DocName::new("probe")?;
    let exists = || {
        Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "the scratch run {SCRATCH_RUN} exists: another probe is running, or one was \
                 killed, or it is a real run; remove it (runstate rm {SCRATCH_RUN} --all) if it \
                 is a leftover"
            ),
        )
        .at_run(Operation::Doctor, &run)
    };
    // A run of that name holding any document (a user's) is refused: the
    // create-only write below only sees the probe's own document.
    let held = store
        .list_docs(&run, None, 1)
        .await
        .map_err(|e| e.with_operation(Operation::Doctor))?;
    if !held.items.is_empty() {
        return Err(exists());
    }
    // Claim the scratch run with a create-only write: another probe running
    // now is refused.
    let claimed = store
        .put(
            &run,
            &doc,
            Bytes::from_static(b"{\"probe\":0}"),
            PutOptions::create(),
        )
        .await;
    match claimed {
        Err(error) if error.kind() == ErrorKind::AlreadyExists => return Err(exists()),
        other => other.map_err(|e| e.with_operation(Operation::Doctor))?,
    };
    let outcome = checks(store, &run, &doc).await;
    // Clean up whatever happened: leases a failed check left behind, then
    // the probe's document. The probe's own error wins over a cleanup
    // error.
    let key = LockKey::Doc(run.clone(), doc.clone());
    let unlocked = store.break_lock(&key, None).await;
    let cleanup = remove_scratch(store, &run, &doc).await;
    let mut report = outcome.map_err(|e| e.with_operation(Operation::Doctor))?;
    unlocked.map_err(|e| e.with_operation(Operation::Doctor))?;
    cleanup.map_err(|e| e.with_operation(Operation::Doctor))?;
    report.capabilities = capability_rows(store.capabilities())
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    Ok(report)
}

/// Deletes the probe's document, then the scratch run (its folder, its
/// indexes) when no other document is left in it: a document someone put
/// there while the probe ran is theirs.
async fn remove_scratch(store: &dyn Lock, run: &RunId, doc: &DocName) -> Result<()> {
    store.delete(run, doc, None).await?;
    if store.list_docs(run, None, 1).await?.items.is_empty() {
        store.delete_run(run).await?;
    }
    Ok(())
}

async fn checks(store: &dyn Lock, run: &RunId, doc: &DocName) -> Result<DoctorReport> {
    let capabilities: Capabilities = store.capabilities().clone();
    let mut report = DoctorReport {
        capabilities: Vec::new(),
        checks: Vec::new(),
        get_micros: 0,
        put_micros: 0,
        lease_micros: 0,
    };
    let payload = Bytes::from_static(b"{\"probe\":1}");

    let mut put_times = Vec::with_capacity(SAMPLES);
    let mut current = None;
    for _ in 0..SAMPLES {
        let started = Instant::now();
        current = Some(store.put_bytes(run, doc, payload.clone()).await?);
        put_times.push(started.elapsed());
    }
    report.put_micros = median_micros(&mut put_times);
    let mut get_times = Vec::with_capacity(SAMPLES);
    let mut read = None;
    for _ in 0..SAMPLES {
        let started = Instant::now();
        read = store.get_bytes(run, doc).await?;
        get_times.push(started.elapsed());
    }
    report.get_micros = median_micros(&mut get_times);
    let read_back =
        read.is_some_and(|d| d.bytes == payload && Some(&d.version) == current.as_ref());
    report.push_check(
        "a write reads back byte-exact with its version",
        read_back,
        "",
    );

    let create = store
        .put(run, doc, payload.clone(), PutOptions::create())
        .await;
    report.push_check(
        "create-only write of an existing document is refused",
        matches!(&create, Err(e) if e.kind() == ErrorKind::AlreadyExists),
        outcome_detail(&create),
    );

    let Some(version) = current else {
        return Ok(report);
    };
    let newer = store
        .put(
            run,
            doc,
            Bytes::from_static(b"{\"probe\":2}"),
            PutOptions::update(version.clone()),
        )
        .await;
    report.push_check(
        "update with the current version succeeds",
        newer.is_ok(),
        outcome_detail(&newer),
    );
    let stale = store
        .put(
            run,
            doc,
            payload.clone(),
            PutOptions::update(version.clone()),
        )
        .await;
    report.push_check(
        "update with a stale version is refused",
        matches!(&stale, Err(e) if e.kind() == ErrorKind::Precondition),
        outcome_detail(&stale),
    );
    if capabilities.conditional_delete {
        let delete = store.delete(run, doc, Some(&version)).await;
        report.push_check(
            "delete with a stale version is refused",
            matches!(&delete, Err(e) if e.kind() == ErrorKind::Precondition),
            outcome_detail(&delete),
        );
    }
    let listed = store.list_all_docs(run).await?;
    report.push_check(
        "the run lists its document",
        listed.len() == 1 && listed[0].name == *doc,
        format!("{} listed", listed.len()),
    );

    if capabilities.leases {
        lease_checks(store, run, doc, &mut report).await?;
    }
    Ok(report)
}

async fn lease_checks(
    store: &dyn Lock,
    run: &RunId,
    doc: &DocName,
    report: &mut DoctorReport,
) -> Result<()> {
    let key = LockKey::Doc(run.clone(), doc.clone());
    let ttl = Duration::from_secs(30);
    let first = Owner::for_this_process();
    let second = first.sibling();
    let mut lease_times = Vec::with_capacity(SAMPLES);
    let mut last_fence = Fence(0);
    let mut fences_grow = true;
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let lease = store.try_acquire(&key, &first, ttl).await?;
        store.release(&lease).await?;
        lease_times.push(started.elapsed());
        fences_grow &= lease.fence() > last_fence;
        last_fence = lease.fence();
    }
    report.lease_micros = median_micros(&mut lease_times);
    report.push_check(
        "fences strictly increase across grants",
        fences_grow,
        format!("last fence {last_fence}"),
    );

    let held = store.try_acquire(&key, &first, ttl).await?;
    let contender = store.try_acquire(&key, &second, ttl).await;
    let shows_holder = matches!(&contender, Err(e) if e.kind() == ErrorKind::Locked
        && e.holder().is_some_and(|h| h.owner.id() == first.id()));
    report.push_check(
        "a held lease refuses a second owner and names the holder",
        shows_holder,
        outcome_detail(&contender),
    );
    if let Ok(stolen) = contender {
        store.release(&stolen).await?;
    }
    let inspected = store.inspect(&key).await?;
    report.push_check(
        "inspect shows the holder",
        inspected.is_some_and(|i| i.owner.id() == first.id() && i.fence == held.fence()),
        "",
    );
    let forged = Lease::new(
        key.clone(),
        second.clone(),
        held.fence(),
        ttl,
        Instant::now(),
        SystemTime::now(),
    );
    let by_other = store.release(&forged).await;
    report.push_check(
        "release by another owner is refused",
        matches!(&by_other, Err(e) if e.kind() == ErrorKind::LeaseLost),
        outcome_detail(&by_other),
    );
    store.break_lock(&key, Some(held.fence())).await?;
    let next = store.try_acquire(&key, &second, ttl).await?;
    let fenced = store
        .put(
            run,
            doc,
            Bytes::from_static(b"{\"probe\":3}"),
            PutOptions::overwrite().with_lease(&held),
        )
        .await;
    report.push_check(
        "a save under a superseded lease is fenced",
        matches!(&fenced, Err(e) if e.kind() == ErrorKind::Fenced),
        outcome_detail(&fenced),
    );
    let current = store
        .put(
            run,
            doc,
            Bytes::from_static(b"{\"probe\":4}"),
            PutOptions::overwrite().with_lease(&next),
        )
        .await;
    report.push_check(
        "a save under the current lease succeeds",
        current.is_ok(),
        outcome_detail(&current),
    );
    store.release(&next).await?;
    Ok(())
}

fn outcome_detail<T>(outcome: &Result<T>) -> String {
    match outcome {
        Ok(_) => "accepted".to_owned(),
        Err(error) => error.kind().to_string(),
    }
}

fn median_micros(samples: &mut [Duration]) -> u64 {
    samples.sort_unstable();
    samples
        .get(samples.len() / 2)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use runstate_core::memory::MemoryStore;
    use runstate_core::{GetOptions, Store};

    use super::*;

    /// A run named like the scratch run holding a document of someone
    /// else's is refused and left whole; the probe used to claim it with
    /// its own document and then delete the whole run.
    #[tokio::test]
    async fn a_real_run_of_the_scratch_name_is_never_touched() {
        let store = MemoryStore::new();
        let run = RunId::new(SCRATCH_RUN).unwrap();
        let keep = DocName::new("climate").unwrap();
        store
            .put(&run, &keep, Bytes::from_static(b"{}"), PutOptions::create())
            .await
            .unwrap();
        let refused = probe(&store).await.expect_err("an existing run");
        assert_eq!(refused.kind(), ErrorKind::AlreadyExists, "{refused}");
        assert!(
            store
                .get(&run, &keep, GetOptions::default())
                .await
                .unwrap()
                .is_some(),
            "kept"
        );
        let probe_doc = DocName::new("probe").unwrap();
        assert!(
            store
                .get(&run, &probe_doc, GetOptions::default())
                .await
                .unwrap()
                .is_none()
        );
    }

    /// On an empty store the probe passes and leaves no run behind.
    #[tokio::test]
    async fn the_probe_leaves_nothing_behind() {
        let store = MemoryStore::new();
        let report = probe(&store).await.unwrap();
        assert!(
            report.checks.iter().all(|c| c.passed),
            "{:?}",
            report.checks
        );
        assert!(store.list_runs(None, 10).await.unwrap().items.is_empty());
    }
}
