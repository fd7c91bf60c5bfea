//! Moving runs between stores, byte-exact and verified: [`migrate`] and
//! [`verify`].
//!
//! A migration copies each selected run while holding the source run's
//! lease (writers that take the run's lock wait) and the target run's lease
//! (no other migration writes it at the same time); both are renewed in the
//! background every third of their TTL for as long as the run takes. Every
//! document is created on the target with [`PutMode::Create`] (replaced
//! with `Update` of the version seen, under `overwrite`), which is
//! conditional by itself: a document someone else saved meanwhile is never
//! overwritten. Each copy is read back and compared by SHA-256 with the
//! source bytes. At the end the source is listed again: a document changed
//! during the copy by a writer that does not take the run's lock (one that
//! locks only the document, or not at all) fails the run instead of leaving
//! a silently stale copy; running it again copies the change. The run's
//! milestones and attributes, which are written without any lock, are
//! read again too: one set or changed after they were copied fails the
//! run the same way, before anything is deleted from the source. A move
//! copies them once more after its deletions, so one marked meanwhile
//! reaches the target too.
//!
//! **A non-empty target run is refused** unless
//! [`overwrite`](MigrateOptions::overwrite) is set, with one exception that
//! makes re-running safe: a target whose documents are all byte-identical
//! to the source's is an earlier copy that was interrupted, and the
//! migration resumes it (copying only what is missing). Re-running a
//! finished migration therefore copies nothing and ends in the same state.
//!
//! With [`delete_source`](MigrateOptions::delete_source), the source
//! documents are deleted only after every document verified, each under its
//! own lock too and only if it is still the version copied. After the
//! first deletion the target is asked for that document: a target that
//! keeps its documents where the source does (the same store under another
//! URL, or with its locks elsewhere) lost it too, gets it back, and the
//! move stops with `InvalidArgument` before it deletes anything else. A move
//! interrupted while deleting resumes: the target may then hold documents
//! the source no longer has, which is accepted only when every document the
//! source still has is already identical on the target; such documents are
//! never deleted from the target, even with `overwrite`, since they may be
//! the only copies left.
//!
//! Runs are streamed in batches: each batch of documents is read from the
//! source with one [`Store::get_many`], written to the target with one
//! [`Store::put_many`] (one statement, one transaction, one pipeline or
//! concurrent requests, where the backend batches natively; each document
//! still created or updated on its own condition) and, where it must be
//! read back, read back with one `get_many`. At most
//! [`concurrency`](MigrateOptions::concurrency) documents of a run are in
//! flight, in up to eight batches at once, and at most
//! [`memory_budget`](MigrateOptions::memory_budget) bytes of documents
//! together across every run in flight (a larger document goes alone). A
//! failed copy stops the run after the batches in flight have finished, so
//! no write lands after the migration has returned.
//!
//! **Verification without reading back.** A copy into S3 whose new version
//! is an ETag equal to the MD5 of the source bytes (a single-part `PUT`
//! without SSE-KMS or SSE-C: the server hashed the bytes it stored) is
//! verified by that comparison instead of being read back
//! (`runstate_s3::version_is_md5_of`, counted in
//! [`RunReport::verified_by_md5`]). Every other copy, into S3 or not, is
//! read back and compared by SHA-256.
//!
//! **Several runs at once.** [`jobs`](MigrateOptions::jobs) runs are
//! migrated at the same time, each with its own leases, sharing the memory
//! budget. Without [`keep_going`](MigrateOptions::keep_going) the first
//! failure stops the migration (the runs in flight finish first, none is
//! started after it) and is returned; with it, every selected run is tried,
//! and the failed ones are listed in [`MigrationReport::failed`], with why.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use runstate_core::{
    DocMeta, DocName, Error, ErrorKind, GetOptions, Lease, Lock, LockExt, LockKey, Milestones,
    Operation, Owner, PutMode, PutOptions, PutRequest, Result, RunId, Store, StoreExt, Version,
    WaitPolicy,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};

/// Which runs to migrate or verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These runs, in this order.
    Runs(Vec<RunId>),
    /// Every run of the source (for [`verify`], of either store).
    All,
}

impl Selection {
    /// The runs named, each once, in the order first named: a run named
    /// twice is copied or verified once (a second pass would see a
    /// finished move); `None` for [`Selection::All`].
    pub fn named_runs(&self) -> Option<Vec<RunId>> {
        match self {
            Selection::Runs(runs) => {
                let mut seen = std::collections::BTreeSet::new();
                Some(runs.iter().filter(|r| seen.insert(*r)).cloned().collect())
            }
            Selection::All => None,
        }
    }
}

/// Settings of [`migrate`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigrateOptions {
    /// The runs to copy.
    pub selection: Selection,
    /// Plan and check only: read both stores, write nothing, take no lease.
    pub dry_run: bool,
    /// Replace target documents that differ from the source and (unless
    /// `delete_source` is set) delete those the source does not have,
    /// instead of refusing.
    pub overwrite: bool,
    /// Delete each run from the source once all of its documents verified.
    pub delete_source: bool,
    /// Who takes the leases.
    pub owner: Owner,
    /// TTL of the leases; they are renewed every third of it.
    pub ttl: Duration,
    /// How long to wait for a run whose lease someone else holds.
    pub wait: WaitPolicy,
    /// Documents of one run copied at the same time: read, written and
    /// verified in up to eight batches at once (fewer when this is below
    /// eight), this many shared among them, rounded down, at least one
    /// each (fewer for small runs, so that their documents still go in
    /// parallel); never more than this many in all. `1` copies one
    /// document at a time.
    pub concurrency: usize,
    /// Bytes of documents in memory at the same time, across every run in
    /// flight (each document counts twice: its source bytes and the copy
    /// read back to verify it).
    pub memory_budget: u64,
    /// Runs migrated at the same time (at least 1; default 1), each under
    /// its own leases and with its own `concurrency`, all within the one
    /// `memory_budget`. The report lists the runs in the order selected
    /// whatever order they finish in.
    pub jobs: usize,
    /// When a run fails, go on with the others (default: stop). The failed
    /// runs are then listed in [`MigrationReport::failed`], each with its
    /// error, and [`migrate`] returns the report (`Ok`) once every
    /// selected run was tried: check `failed` before trusting it. Without
    /// it, the first failure stops the migration (runs in flight finish,
    /// no other starts) and is returned as the error.
    pub keep_going: bool,
}

/// Default of [`MigrateOptions::concurrency`].
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default of [`MigrateOptions::memory_budget`]: 32 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 32 * 1024 * 1024;
/// Default of [`MigrateOptions::jobs`].
pub const DEFAULT_JOBS: usize = 1;

/// Batches of one run in flight at most (see
/// [`MigrateOptions::concurrency`]).
const LANES: usize = 8;

impl MigrateOptions {
    /// Copy `selection` with the defaults: no overwrite, keep the source,
    /// 30 s leases, wait up to 30 s for a busy run.
    pub fn new(selection: Selection) -> Self {
        MigrateOptions {
            selection,
            dry_run: false,
            overwrite: false,
            delete_source: false,
            owner: Owner::for_this_process(),
            ttl: Duration::from_secs(30),
            wait: WaitPolicy::default(),
            concurrency: DEFAULT_CONCURRENCY,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            jobs: DEFAULT_JOBS,
            keep_going: false,
        }
    }

    /// Sets [`dry_run`](Self::dry_run).
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets [`overwrite`](Self::overwrite).
    pub fn with_overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Sets [`delete_source`](Self::delete_source).
    pub fn with_delete_source(mut self, delete_source: bool) -> Self {
        self.delete_source = delete_source;
        self
    }

    /// Sets the lease TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the wait policy for busy runs.
    pub fn with_wait(mut self, wait: WaitPolicy) -> Self {
        self.wait = wait;
        self
    }

    /// Sets how many documents are copied at once (at least 1).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the memory budget of documents in flight.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes.max(1);
        self
    }

    /// Sets the lease owner.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self.owner = owner;
        self
    }

    /// Sets how many runs are migrated at the same time (at least 1).
    pub fn with_jobs(mut self, jobs: usize) -> Self {
        self.jobs = jobs.max(1);
        self
    }

    /// Sets whether a failed run lets the others continue (see
    /// [`keep_going`](Self::keep_going)).
    pub fn with_keep_going(mut self, keep_going: bool) -> Self {
        self.keep_going = keep_going;
        self
    }
}

/// Told how a migration or verification advances; every method has an
/// empty default. `()` reports nothing.
pub trait Progress: Send + Sync {
    /// The number of runs about to be processed.
    fn runs(&self, total: usize) {
        let _ = total;
    }
    /// A run starts: how many documents and bytes it holds on the source.
    fn run_started(&self, run: &RunId, documents: usize, bytes: u64) {
        let _ = (run, documents, bytes);
    }
    /// A document was copied and verified (or compared, for [`verify`]).
    fn document_done(&self, run: &RunId, doc: &DocName, bytes: u64) {
        let _ = (run, doc, bytes);
    }
    /// A run is done.
    fn run_finished(&self, run: &RunId) {
        let _ = run;
    }
    /// A run failed (and, with [`MigrateOptions::keep_going`], the others
    /// go on).
    fn run_failed(&self, run: &RunId, error: &Error) {
        let _ = (run, error);
    }
}

impl Progress for () {}

/// What happened to one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// The run.
    pub run: Option<RunId>,
    /// Documents the source run holds.
    pub documents: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Documents created on the target.
    pub copied: u64,
    /// Bytes created on the target.
    pub copied_bytes: u64,
    /// Documents already on the target with the same bytes (a resumed copy).
    pub identical: u64,
    /// Target documents that differed and were replaced (`overwrite`).
    pub replaced: u64,
    /// Target documents the source lacks that were deleted (`overwrite`).
    pub removed: u64,
    /// Documents verified: found identical, or copied and then read back
    /// and matched by SHA-256 or proven by the target's MD5 (see
    /// `verified_by_md5`).
    pub verified: u64,
    /// Of the copies, those verified without reading them back: the target
    /// (S3) returned as their version an ETag equal to the MD5 of the
    /// source bytes, computed by the server on the bytes it stored.
    pub verified_by_md5: u64,
    /// Whether the run was deleted from the source.
    pub source_deleted: bool,
    /// Milestones and attributes copied (set on the target because they
    /// were missing there or differed).
    pub milestones: u64,
}

/// What [`migrate`] did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// One entry per run, in order.
    pub runs: Vec<RunReport>,
    /// Documents created or replaced on the target.
    pub documents: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Documents verified by hash (copied ones and identical ones).
    pub verified: u64,
    /// Of those, copies verified by the target's MD5 without reading them
    /// back (see [`RunReport::verified_by_md5`]).
    pub verified_by_md5: u64,
    /// Documents found already identical on the target.
    pub identical: u64,
    /// The runs that failed, in the order selected (only with
    /// [`MigrateOptions::keep_going`]; otherwise the first failure is the
    /// error [`migrate`] returns). Their documents are not counted above:
    /// some may have been copied (and verified) before the failure, and
    /// running the migration again resumes them.
    pub failed: Vec<RunFailure>,
    /// Wall time.
    pub elapsed_secs: f64,
}

/// A run that failed, with why (see [`MigrationReport::failed`]).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RunFailure {
    /// The run.
    pub run: RunId,
    /// What kind of failure (serialized as [`ErrorKind::as_str`]).
    #[serde(serialize_with = "kind_name")]
    pub kind: ErrorKind,
    /// The error and its causes on one line, naming the document when one
    /// is concerned.
    pub error: String,
}

impl RunFailure {
    fn new(run: &RunId, error: &Error) -> Self {
        RunFailure {
            run: run.clone(),
            kind: error.kind(),
            error: runstate_core::display_chain(error),
        }
    }
}

fn kind_name<S: serde::Serializer>(
    kind: &ErrorKind,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.as_str())
}

impl MigrationReport {
    /// Documents copied per second.
    pub fn documents_per_sec(&self) -> f64 {
        per_sec(self.documents as f64, self.elapsed_secs)
    }

    /// Megabytes (10^6 bytes) copied per second.
    pub fn mb_per_sec(&self) -> f64 {
        per_sec(self.bytes as f64 / 1e6, self.elapsed_secs)
    }
}

fn per_sec(amount: f64, secs: f64) -> f64 {
    if secs > 0.0 { amount / secs } else { 0.0 }
}

/// One way two stores disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// The source has the document, the target does not.
    MissingOnTarget {
        /// The run.
        run: RunId,
        /// The document.
        doc: DocName,
    },
    /// The target has a document the source does not.
    OnlyOnTarget {
        /// The run.
        run: RunId,
        /// The document.
        doc: DocName,
    },
    /// Both have it, with different bytes.
    Differs {
        /// The run.
        run: RunId,
        /// The document.
        doc: DocName,
        /// SHA-256 of the source bytes, in hex.
        source_sha256: String,
        /// SHA-256 of the target bytes, in hex.
        target_sha256: String,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::MissingOnTarget { run, doc } => write!(f, "{run}/{doc}: missing on target"),
            Difference::OnlyOnTarget { run, doc } => write!(f, "{run}/{doc}: only on target"),
            Difference::Differs {
                run,
                doc,
                source_sha256,
                target_sha256,
            } => write!(
                f,
                "{run}/{doc}: differs (source sha256 {source_sha256}, target sha256 {target_sha256})"
            ),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Runs compared.
    pub runs: u64,
    /// Documents compared (present on both sides).
    pub documents: u64,
    /// Bytes read from each side.
    pub bytes: u64,
    /// Every difference, run by run: documents missing on the target, then
    /// those that differ, then those only on the target, each in name order.
    pub differences: Vec<Difference>,
    /// Wall time.
    pub elapsed_secs: f64,
}

impl VerifyReport {
    /// Whether the stores agree on every compared run.
    pub fn identical(&self) -> bool {
        self.differences.is_empty()
    }
}

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Copies runs from `source` to `target` (see the [module
/// documentation](self) for the guarantees). [`jobs`](MigrateOptions::jobs)
/// runs are processed at a time, in the order selected; the first run that
/// fails stops the migration (unless
/// [`keep_going`](MigrateOptions::keep_going)), and running it again
/// resumes.
///
/// # Errors
/// [`ErrorKind::AlreadyExists`] when a target run holds documents that
/// differ from the source (or that the source lacks) and `overwrite` is
/// off; [`ErrorKind::NotFound`] for a selected run the source does not
/// have; [`ErrorKind::Locked`] when a run stays locked longer than the
/// wait policy; [`ErrorKind::Precondition`] when the source changed during
/// the copy; [`ErrorKind::Corrupt`] when a document reads back different;
/// [`ErrorKind::InvalidArgument`] when, moving with `delete_source`, the
/// target turns out to keep its documents where the source does (the
/// first document deleted is written back; nothing else is deleted);
/// [`ErrorKind::LeaseLost`] when a run's lease could not be kept; backend
/// errors. Every error names the run (and the document). With
/// `keep_going`, the failures of runs are in the report instead, and only
/// a failure to list the source's runs is an error.
pub async fn migrate(
    source: &dyn Lock,
    target: &dyn Lock,
    options: &MigrateOptions,
    progress: &dyn Progress,
) -> Result<MigrationReport> {
    let started = Instant::now();
    let runs = match options.selection.named_runs() {
        Some(runs) => runs,
        None => source.list_all_runs().await?,
    };
    progress.runs(runs.len());
    let budget = Budget::new(options.memory_budget);
    let jobs = options.jobs.max(1);
    let mut outcomes: Vec<Option<Result<RunReport>>> = runs.iter().map(|_| None).collect();
    let mut next = 0;
    let mut stopped = false;
    // A loop over `FuturesUnordered`, as for the batches of a run (see
    // `Migration::locked`): runs in flight after a failure are awaited,
    // not dropped.
    let mut running = FuturesUnordered::new();
    loop {
        while !stopped && running.len() < jobs && next < runs.len() {
            let (index, run) = (next, &runs[next]);
            next += 1;
            let budget = &budget;
            running.push(async move {
                let outcome = Migration {
                    source,
                    target,
                    options,
                    progress,
                    run,
                    budget,
                }
                .run()
                .await
                .map_err(|e| with_run_context(e, run, Operation::Migrate));
                (index, outcome)
            });
        }
        let Some((index, outcome)) = running.next().await else {
            break;
        };
        match &outcome {
            Ok(_) => progress.run_finished(&runs[index]),
            Err(error) => {
                progress.run_failed(&runs[index], error);
                stopped |= !options.keep_going;
            }
        }
        outcomes[index] = Some(outcome);
    }
    let mut report = MigrationReport {
        dry_run: options.dry_run,
        ..MigrationReport::default()
    };
    // Runs never started after a failure have no outcome.
    for (run, outcome) in runs.iter().zip(outcomes) {
        match outcome {
            None => {}
            Some(Ok(outcome)) => {
                report.documents += outcome.copied + outcome.replaced;
                report.bytes += outcome.copied_bytes;
                report.verified += outcome.verified;
                report.verified_by_md5 += outcome.verified_by_md5;
                report.identical += outcome.identical;
                report.runs.push(outcome);
            }
            Some(Err(error)) if options.keep_going => {
                report.failed.push(RunFailure::new(run, &error));
            }
            // The first failure in the order selected.
            Some(Err(error)) => return Err(error),
        }
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Keeps a backend error's own operation, and adds the run and the
/// operation when the error has none.
fn with_run_context(error: Error, run: &RunId, operation: Operation) -> Error {
    let error = if error.run().is_none() {
        error.with_run(run)
    } else {
        error
    };
    error.with_operation(operation)
}

/// A milestone (the first by name) or, when none differs, an attribute
/// that `after` set, changed or dropped since `before`, described for an
/// error.
fn first_milestone_change(before: &Milestones, after: &Milestones) -> Option<String> {
    first_difference(&before.timestamps, &after.timestamps)
        .map(|task| format!("milestone `{task}`"))
        .or_else(|| {
            first_difference(&before.attrs, &after.attrs).map(|name| format!("attribute `{name}`"))
        })
}

/// The first document (by name) that differs between two listings of one
/// run: changed, added or removed; `None` when they are the same.
fn first_change<'a>(before: &'a [DocMeta], after: &'a [DocMeta]) -> Option<&'a DocName> {
    let listed: BTreeMap<&DocName, &Version> =
        before.iter().map(|m| (&m.name, &m.version)).collect();
    let now: BTreeMap<&DocName, &Version> = after.iter().map(|m| (&m.name, &m.version)).collect();
    first_difference(&listed, &now).copied()
}

/// The smallest key whose value differs between two maps (set, changed or
/// removed); `None` when they are equal.
fn first_difference<'m, K: Ord, V: PartialEq>(
    before: &'m BTreeMap<K, V>,
    after: &'m BTreeMap<K, V>,
) -> Option<&'m K> {
    before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .min()
}

/// Whether the target's milestone or attribute (`there`) is to be set to
/// the source's (`here`): where it lacks one, or holds another value
/// unless the source's may be the older one (`fill_only`).
fn to_set<T: PartialEq>(there: Option<&T>, here: &T, fill_only: bool) -> bool {
    match there {
        None => true,
        Some(there) => !fill_only && there != here,
    }
}

/// The refusal to delete a source document whose verified copy is no longer
/// on the target.
fn vanished_from_target(run: &RunId, doc: &DocName) -> Error {
    migrate_error(
        ErrorKind::Precondition,
        "the copy of the document vanished from the target before the source was deleted (a \
         writer that does not take the run's lock?); nothing was deleted; run the migration \
         again"
            .into(),
        run,
    )
    .with_doc(doc)
}

fn migrate_error(kind: ErrorKind, message: String, run: &RunId) -> Error {
    Error::new(kind, message).at_run(Operation::Migrate, run)
}

/// How one run's documents relate across the two stores.
#[derive(Default)]
struct Plan {
    /// Every source document, as listed under the source lease.
    source: Vec<DocMeta>,
    /// Absent on the target: created.
    create: Vec<DocMeta>,
    /// Different on the target: replaced (with `overwrite`), with the
    /// target's version.
    replace: Vec<(DocMeta, Version)>,
    /// Already identical on the target.
    identical: Vec<DocMeta>,
    /// On the target only, with the target's version.
    extra: Vec<(DocName, Version)>,
    /// A move resumed with nothing left on the source
    /// ([`Migration::resumable_move`]): the source's milestones may be
    /// older than the target's, so they only fill in what it lacks.
    resumed: bool,
}

/// Where a lease of the migration stands.
enum LeaseState {
    /// Not taken yet.
    Pending,
    /// Held, renewed in the background.
    Held(Lease),
    /// Lost: a renewal was refused, with why.
    Lost(String),
}

/// A lease the migration holds on one run, kept alive by [`keep_alive`]
/// while the run is copied, whatever step is slow.
struct HeldLease<'a> {
    store: &'a dyn Lock,
    state: std::sync::Mutex<LeaseState>,
    ttl: Duration,
}

impl<'a> HeldLease<'a> {
    fn new(store: &'a dyn Lock, ttl: Duration) -> Self {
        HeldLease {
            store,
            state: std::sync::Mutex::new(LeaseState::Pending),
            ttl,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        // A panic elsewhere cannot leave the state half-written: every
        // update is a single assignment.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, lease: Lease) {
        *self.state() = LeaseState::Held(lease);
    }

    /// The lease, or `LeaseLost` once it expired or a renewal was refused:
    /// every step checks it before it touches a store.
    fn current(&self) -> Result<Lease> {
        match &*self.state() {
            LeaseState::Held(lease) if !lease.is_expired() => Ok(lease.clone()),
            LeaseState::Held(lease) => {
                Err(
                    Error::lease_lost_because(lease.key(), "the migration's lease expired", None)
                        .with_operation(Operation::Migrate),
                )
            }
            LeaseState::Lost(why) => Err(Error::new(
                ErrorKind::LeaseLost,
                format!("the migration's lease was lost: {why}"),
            )
            .with_operation(Operation::Migrate)),
            LeaseState::Pending => Err(Error::new(
                ErrorKind::LeaseLost,
                "the migration's lease was not taken",
            )
            .with_operation(Operation::Migrate)),
        }
    }

    /// Extends the lease by its TTL. A refusal
    /// ([`Error::is_lease_refusal`]) marks it lost; another failure (a dropped
    /// connection, a timeout) leaves it held, to be tried again, until its
    /// local deadline passes ([`current`](Self::current) then reports it
    /// lost).
    async fn renew(&self) -> Result<()> {
        let lease = match &*self.state() {
            LeaseState::Held(lease) => lease.clone(),
            _ => return Ok(()),
        };
        match self.store.renew(&lease, self.ttl).await {
            Ok(renewed) => {
                self.set(renewed);
                Ok(())
            }
            Err(error) => {
                if error.is_lease_refusal() {
                    *self.state() = LeaseState::Lost(error.to_string());
                } else {
                    tracing::warn!(
                        lock = %lease.key(),
                        remaining_ms = lease.remaining().as_millis() as u64,
                        %error,
                        "a migration's lease renewal failed; retrying"
                    );
                }
                Err(error)
            }
        }
    }

    /// When the held lease is due for renewal (`None` when none is held).
    fn due_in(&self) -> Option<Duration> {
        match &*self.state() {
            LeaseState::Held(lease) => Some(lease.renewal_due_in()),
            _ => None,
        }
    }

    /// Renews the held lease if it is due, or at once after a failure
    /// (`retry`).
    async fn renew_if_due(&self, retry: bool) -> Result<()> {
        let due = match &*self.state() {
            LeaseState::Held(lease) => lease.is_renewal_due() || retry,
            _ => false,
        };
        if due { self.renew().await } else { Ok(()) }
    }

    /// Whether the lease is lost for good: a renewal was refused, or its
    /// local deadline passed.
    fn is_lost(&self) -> bool {
        match &*self.state() {
            LeaseState::Held(lease) => lease.is_expired(),
            LeaseState::Lost(_) => true,
            LeaseState::Pending => false,
        }
    }

    /// Releases the lease unless a renewal was refused, also once its
    /// local deadline passed: a renewal whose reply was lost may have
    /// extended it on the store (not on a store whose renewal swaps a token,
    /// S3: there the retry was refused, and the lease expires by its TTL).
    /// A lease the store no longer holds is only logged, because the final
    /// source check has proven the copy.
    async fn release(&self) -> Result<()> {
        let lease = match std::mem::replace(&mut *self.state(), LeaseState::Pending) {
            LeaseState::Held(lease) => lease,
            _ => return Ok(()),
        };
        match self.store.release(&lease).await {
            Err(e) if e.kind() == ErrorKind::LeaseLost => {
                tracing::warn!(lock = %lease.key(), "lease lost before release: {e}");
                Ok(())
            }
            other => other,
        }
    }
}

/// Renews both leases until `done` is notified, each a third of its TTL
/// after it was issued ([`Lease::renewal_due_in`]), so that no single slow
/// step (a long plan, a wait for the target lock, a large document) lets
/// them expire; both in one go when both are due. A renewal that failed
/// without a refusal is tried again after a twelfth of the TTL; a refused
/// renewal, or a lease whose deadline passed, stops it, and the next step
/// of the migration then fails with `LeaseLost`.
async fn keep_alive(leases: [&HeldLease<'_>; 2], ttl: Duration, done: &Notify) {
    // Which lease's last renewal failed (without a refusal).
    let mut retry = [false; 2];
    loop {
        // The next lease due; a failed renewal is tried again after a
        // twelfth of the TTL at the latest.
        let wait = leases
            .iter()
            .zip(retry)
            .filter_map(|(lease, retrying)| {
                if retrying {
                    Some(ttl / 12)
                } else {
                    lease.due_in()
                }
            })
            .min()
            .unwrap_or(ttl / 3);
        tokio::select! {
            // Done wins over a renewal that is due at the same moment.
            biased;
            () = done.notified() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let [source, target] = leases;
        let (first, second) =
            tokio::join!(source.renew_if_due(retry[0]), target.renew_if_due(retry[1]));
        for (i, (lease, outcome)) in [(source, first), (target, second)].into_iter().enumerate() {
            retry[i] = outcome.is_err();
            if retry[i] && lease.is_lost() {
                return;
            }
        }
    }
}

/// The memory budget of a migration: permits of a KiB each, shared by
/// every run in flight. A batch takes its documents' cost at once (each
/// document counts twice: its bytes and their copy read back), at most
/// the whole budget (a larger document goes alone), and gives it back
/// when it is done.
struct Budget {
    permits: Semaphore,
    units: u64,
}

impl Budget {
    fn new(bytes: u64) -> Self {
        let units = units(bytes).max(1);
        Budget {
            permits: Semaphore::new(usize::try_from(units).unwrap_or(usize::MAX >> 4)),
            units,
        }
    }

    /// What `docs` cost in budget units.
    fn cost<'a>(docs: impl IntoIterator<Item = &'a DocMeta>) -> u64 {
        docs.into_iter()
            .map(|meta| units(meta.size.saturating_mul(2)).max(1))
            .sum()
    }

    async fn take(&self, cost: u64, run: &RunId) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let cost = cost.clamp(1, self.units);
        self.permits
            .acquire_many(u32::try_from(cost).unwrap_or(u32::MAX))
            .await
            .map_err(|e| {
                migrate_error(ErrorKind::Backend, "memory budget closed".into(), run).with_source(e)
            })
    }
}

/// Adds the document to an error that does not name one.
fn naming(error: Error, doc: &DocName) -> Error {
    if error.doc().is_none() {
        error.with_doc(doc)
    } else {
        error
    }
}

/// Whether `target` proves, by the version it returned for a write of
/// `bytes`, that it stored exactly those bytes, so that the copy needs no
/// read-back: an S3 ETag that is the MD5 of the bytes (computed by the
/// server on what it received; see `runstate_s3::version_is_md5_of`).
/// Only the S3 backend is asked (by its name in the capabilities, which
/// the layers and caches in front of it keep); every other store's
/// versions prove nothing, and its copies are read back.
fn proven_by_version(target: &dyn Lock, version: &Version, bytes: &[u8]) -> bool {
    #[cfg(feature = "s3")]
    if target.capabilities().backend == runstate_s3::BACKEND {
        return runstate_s3::version_is_md5_of(version, bytes);
    }
    let _ = (target, version, bytes);
    false
}

/// What one batch of copies did.
#[derive(Default)]
struct Copied {
    bytes: u64,
    by_md5: u64,
}

struct Migration<'a> {
    source: &'a dyn Lock,
    target: &'a dyn Lock,
    options: &'a MigrateOptions,
    progress: &'a dyn Progress,
    run: &'a RunId,
    budget: &'a Budget,
}

impl Migration<'_> {
    async fn run(&self) -> Result<RunReport> {
        if self.options.dry_run {
            let plan = self.plan().await?;
            self.check_plan(&plan)?;
            self.progress.run_started(
                self.run,
                plan.source.len(),
                plan.source.iter().map(|m| m.size).sum(),
            );
            return Ok(self.report(&plan, 0));
        }
        let key = LockKey::Run(self.run.clone());
        let options = self.options;
        let source_lease = HeldLease::new(self.source, options.ttl);
        let target_lease = HeldLease::new(self.target, options.ttl);
        source_lease.set(
            self.source
                .acquire(&key, &options.owner, options.ttl, &options.wait)
                .await?,
        );
        let done = Notify::new();
        let work = async {
            let outcome = async {
                target_lease.set(
                    self.target
                        .acquire(&key, &options.owner, options.ttl, &options.wait)
                        .await?,
                );
                self.locked(&source_lease, &target_lease).await
            }
            .await;
            done.notify_one();
            outcome
        };
        let (outcome, ()) = tokio::join!(
            work,
            keep_alive([&source_lease, &target_lease], options.ttl, &done)
        );
        // Release both whatever happened; the copy's own error wins, and a
        // failed release after a finished copy only means the lease expires
        // by its TTL.
        let released = [target_lease.release().await, source_lease.release().await];
        let report = outcome?;
        for release in released {
            if let Err(error) = release {
                tracing::warn!(run = %self.run, "release after the migration failed: {error}");
            }
        }
        Ok(report)
    }

    /// The migration of one run, under both leases.
    async fn locked(&self, source: &HeldLease<'_>, target: &HeldLease<'_>) -> Result<RunReport> {
        let plan = self.plan().await?;
        self.check_plan(&plan)?;
        let bytes: u64 = plan.source.iter().map(|m| m.size).sum();
        self.progress
            .run_started(self.run, plan.source.len(), bytes);
        for meta in &plan.identical {
            self.progress.document_done(self.run, &meta.name, meta.size);
        }

        let jobs: Vec<(&DocMeta, PutMode)> = plan
            .create
            .iter()
            .map(|meta| (meta, PutMode::Create))
            .chain(
                plan.replace
                    .iter()
                    .map(|(meta, version)| (meta, PutMode::Update(version.clone()))),
            )
            .collect();
        let lanes = self.options.concurrency.clamp(1, LANES);
        let mut batches = self.batches(&jobs, lanes).into_iter();
        // A loop over `FuturesUnordered` rather than stream combinators with
        // closures: those make the future lose `Send` for borrowed inputs,
        // and a migration must be spawnable.
        // After a failure the batches in flight are awaited, not dropped:
        // dropping a future does not stop a write the server (or a blocking
        // thread) already has, and none may land after the leases are gone.
        let mut running = FuturesUnordered::new();
        let mut copied = Copied::default();
        let mut failure = None;
        loop {
            while failure.is_none() && running.len() < lanes {
                let Some(batch) = batches.next() else {
                    break;
                };
                running.push(self.copy_batch(batch, source, target));
            }
            match running.next().await {
                Some(Ok(done)) => {
                    copied.bytes += done.bytes;
                    copied.by_md5 += done.by_md5;
                }
                Some(Err(error)) => {
                    failure.get_or_insert(error);
                }
                None => break,
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }

        let (milestones, copied_milestones) = self.copy_milestones(target, plan.resumed).await?;

        // Extras are removed only when the target is to mirror the source:
        // with `delete_source` they may be documents a resumed move already
        // deleted from the source, the only copies left.
        if self.options.overwrite && !self.options.delete_source {
            let conditional = self.target.capabilities().conditional_delete;
            for (name, version) in &plan.extra {
                target.current()?;
                self.target
                    .delete(self.run, name, conditional.then_some(version))
                    .await?;
            }
        }

        // The run's lease keeps out writers that take it; this catches the
        // others (writers taking only a document's lock, or none), before
        // anything is deleted.
        source.current()?;
        let now = self.source.list_all_docs(self.run).await?;
        if let Some(changed) = first_change(&plan.source, &now) {
            return Err(migrate_error(
                ErrorKind::Precondition,
                format!(
                    "the source run changed during the migration (a writer that does not take \
                     the run's lock?): it listed {} documents before and {} after, and this \
                     one changed, appeared or vanished; run the migration again",
                    plan.source.len(),
                    now.len()
                ),
                self.run,
            )
            .with_doc(changed));
        }
        // Milestones and attributes are written without any lock: one set
        // after they were copied would be missing on the target (and a
        // move would then leave it behind on the source).
        if let Some(before) = copied_milestones {
            let now = self.source.milestones(self.run).await?;
            if let Some(changed) = first_milestone_change(&before, &now) {
                return Err(migrate_error(
                    ErrorKind::Precondition,
                    format!(
                        "the source run's milestones or attributes changed during the migration \
                         ({changed}); nothing was deleted from the source; run the migration again"
                    ),
                    self.run,
                ));
            }
        }

        let mut report = self.report(&plan, copied.bytes);
        report.milestones = milestones;
        report.verified_by_md5 = copied.by_md5;
        if self.options.delete_source {
            // A milestone marked while the documents were deleted would
            // stay behind on the source: copied as the first ones were,
            // right before the last document goes (or at once, with none
            // left), so that a source run left empty means a move that
            // finished, whose milestones a second run only fills in.
            let last = plan.source.len().saturating_sub(1);
            if plan.source.is_empty() {
                report.milestones += self.copy_milestones(target, plan.resumed).await?.0;
            }
            for (i, meta) in plan.source.iter().enumerate() {
                if i == last {
                    report.milestones += self.copy_milestones(target, plan.resumed).await?.0;
                }
                if i == 0 {
                    self.delete_first_source_doc(meta, source, target).await?;
                } else {
                    self.delete_source_doc(meta, source, target).await?;
                }
            }
            report.source_deleted = true;
        }
        Ok(report)
    }

    /// Deletes the first source document of a move like the others
    /// ([`delete_source_doc`](Self::delete_source_doc)), then makes sure
    /// the target still has it, as it was. A target that keeps its
    /// documents where the source does (the same store under another URL,
    /// or with its locks elsewhere: `file:///runs` and
    /// `file:///runs?locks=redis://…`) passes every other check: each
    /// document is "identical" on the target, and the leases are granted.
    /// Deleting from the source then deletes from the target, and a move
    /// would delete the only copy of every document.
    ///
    /// The check is made however the delete ended (a delete cut off by a
    /// timeout may still have been made). Unless the target answers that
    /// it holds the very version read from it beforehand, the move stops
    /// here, before any other document is deleted, and the document, read
    /// from the target beforehand, is written back (conditionally:
    /// `Create`) when the target no longer has it or cannot tell.
    ///
    /// # Errors
    /// `InvalidArgument` when the document vanished from the target with
    /// the source's (it was written back, or is there again; a failed
    /// delete or check is its source); the delete's own error when it
    /// failed and the target still has the document;
    /// `Precondition` when the target lacked it already, before anything
    /// was deleted, or holds another version of it after the delete; the
    /// error of the check when it failed (nothing else is deleted); a
    /// non-retryable error saying the document may be lost when the
    /// write-back failed (also logged).
    async fn delete_first_source_doc(
        &self,
        meta: &DocMeta,
        source: &HeldLease<'_>,
        target: &HeldLease<'_>,
    ) -> Result<()> {
        let _permit = self
            .budget
            .take(Budget::cost(std::iter::once(meta)), self.run)
            .await?;
        target.current()?;
        let kept = self
            .target
            .get(self.run, &meta.name, GetOptions::new())
            .await?
            .ok_or_else(|| vanished_from_target(self.run, &meta.name))?;
        let deleted = self.delete_source_doc(meta, source, target).await;
        if matches!(&deleted, Err(e) if e.kind() == ErrorKind::LeaseLost) {
            // Refused by the migration's own lease checks, before anything
            // was deleted: the target's run may be someone else's now, so
            // nothing is written back to it.
            return deleted;
        }
        // From here on the bytes in `kept` may be the only copy left: no
        // lease check, no early return before they are safe.
        let check = self.target.head(self.run, &meta.name).await;
        if let Ok(Some(stat)) = &check
            && stat.version == kept.version
        {
            return deleted;
        }
        let written_back = match &check {
            // Another version: the target has the document, not ours.
            Ok(Some(_)) => Ok(false),
            Ok(None) | Err(_) => self.write_back(&meta.name, kept.bytes).await,
        };
        let written_back = match written_back {
            Ok(written_back) => written_back,
            Err(error) => {
                let lost = "the document may have been deleted from the source, the target may \
                            not have it, and writing it back failed: it may be lost";
                tracing::error!(run = %self.run, doc = %meta.name, "{lost} ({error})");
                return Err(migrate_error(error.kind(), lost.into(), self.run)
                    .with_doc(&meta.name)
                    .with_source(error)
                    .set_retryable(false));
            }
        };
        let error = match check {
            // Gone from the target with the source's, or found missing
            // when the target could not be asked: the documents are
            // shared, whatever else failed (kept as the source).
            Ok(None) => Some(deleted.err()),
            Err(check_error) if written_back => Some(Some(check_error)),
            Err(check_error) => {
                deleted?;
                return Err(check_error.with_doc(&meta.name));
            }
            Ok(Some(_)) => {
                deleted?;
                return Err(migrate_error(
                    ErrorKind::Precondition,
                    "the target's copy changed as the source's was deleted (a writer that does \
                     not take the run's lock, or the same documents under two URLs?); nothing \
                     else was deleted; run the migration again"
                        .into(),
                    self.run,
                )
                .with_doc(&meta.name));
            }
        };
        let shared = migrate_error(
            ErrorKind::InvalidArgument,
            "deleting the document from the source deleted it from the target too: the two \
             stores keep their documents in the same place (the same store under another URL, \
             or with its locks elsewhere?); the document is on the target again and nothing \
             else was deleted"
                .into(),
            self.run,
        )
        .with_doc(&meta.name);
        Err(match error.flatten() {
            Some(cause) => shared.with_source(cause),
            None => shared,
        })
    }

    /// Writes `bytes` back to the target as `doc` if it has none
    /// (`Create`): `true` when written, `false` when the target has one
    /// again. Tried three times over about a third of a second while the
    /// failure is retryable: these bytes may be the document's only copy.
    async fn write_back(&self, doc: &DocName, bytes: Bytes) -> Result<bool> {
        let mut pause = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .target
                .put(self.run, doc, bytes.clone(), PutOptions::create())
                .await
            {
                Ok(_) => return Ok(true),
                Err(error) if error.kind() == ErrorKind::AlreadyExists => return Ok(false),
                Err(error) if error.is_retryable() && tries < 3 => {
                    tracing::warn!(run = %self.run, %doc, "writing back failed, trying again: {error}");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Copies the run's milestones and attributes (a field at a time, as
    /// they are written) where the target lacks them or holds another
    /// value (only where it lacks them with `fill_only`: a move resumed
    /// with nothing left on the source, or run again after it finished,
    /// whose source keeps the milestones of the time it moved while the
    /// target's went on); returns how many were set and what was copied (`None` when
    /// the source keeps no milestones at all). Nothing to copy when the
    /// source has none; a target that cannot keep them while the source
    /// has some fails the run, rather than dropping them silently.
    async fn copy_milestones(
        &self,
        target: &HeldLease<'_>,
        fill_only: bool,
    ) -> Result<(u64, Option<Milestones>)> {
        if !self.source.capabilities().milestones {
            return Ok((0, None));
        }
        let from = self.source.milestones(self.run).await?;
        if from.timestamps.is_empty() && from.attrs.is_empty() {
            return Ok((0, Some(from)));
        }
        if !self.target.capabilities().milestones {
            return Err(migrate_error(
                ErrorKind::Unsupported,
                format!(
                    "the run has {} milestones and attributes, and the target ({}) cannot keep them",
                    from.timestamps.len() + from.attrs.len(),
                    self.target.capabilities().backend
                ),
                self.run,
            ));
        }
        let there = self.target.milestones(self.run).await?;
        let mut set = 0;
        for (task, at) in &from.timestamps {
            if to_set(there.timestamps.get(task), at, fill_only) {
                target.current()?;
                self.target.mark(self.run, task, *at).await?;
                set += 1;
            }
        }
        for (name, value) in &from.attrs {
            if to_set(there.attrs.get(name), value, fill_only) {
                target.current()?;
                self.target.set_attr(self.run, name, value).await?;
                set += 1;
            }
        }
        Ok((set, Some(from)))
    }

    /// Deletes one verified source document under its own lock as well as
    /// the run's (writers that lock only the document are kept out too),
    /// and only if it is still the version that was copied: conditionally
    /// where the backend can, else checked just before under that lock by
    /// its version alone ([`Store::head`]: the bytes are not read again).
    ///
    /// Both runs' leases are checked before the document's lock is asked
    /// for and again once it is held (that may have waited): with the
    /// target's lease lost, someone else may be changing or deleting the
    /// copies, and with the source's, the document itself.
    async fn delete_source_doc(
        &self,
        meta: &DocMeta,
        source: &HeldLease<'_>,
        target: &HeldLease<'_>,
    ) -> Result<()> {
        let both = || source.current().and_then(|_| target.current());
        both()?;
        let options = self.options;
        let key = LockKey::Doc(self.run.clone(), meta.name.clone());
        let lease = self
            .source
            .acquire(&key, &options.owner, options.ttl, &options.wait)
            .await?;
        let outcome = async {
            both()?;
            if self.source.capabilities().conditional_delete {
                return self
                    .source
                    .delete(self.run, &meta.name, Some(&meta.version))
                    .await;
            }
            // The version is all the check needs: a `head` (metadata only,
            // where the backend has it natively) rather than reading the
            // document's bytes a second time.
            let now = self.source.head(self.run, &meta.name).await?;
            if now.is_some_and(|d| d.version != meta.version) {
                return Err(migrate_error(
                    ErrorKind::Precondition,
                    "the source document changed after it was copied; run the migration again"
                        .into(),
                    self.run,
                )
                .with_doc(&meta.name));
            }
            self.source.delete(self.run, &meta.name, None).await
        }
        .await;
        if let Err(error) = self.source.release(&lease).await {
            tracing::warn!(lock = %key, "release after deleting failed: {error}");
        }
        outcome.map(|_| ())
    }

    /// Splits the copies into batches: as many as `lanes` can run at once
    /// with up to `concurrency` documents in flight (fewer per batch when
    /// the run is small, so that its documents still go in parallel), and
    /// each costing at most the budget's share of a lane (a larger
    /// document goes alone).
    fn batches<'j>(
        &self,
        jobs: &'j [(&'j DocMeta, PutMode)],
        lanes: usize,
    ) -> Vec<&'j [(&'j DocMeta, PutMode)]> {
        // Rounded down: `lanes` batches of it in flight at once stay
        // within `concurrency` (rounded up, 9 made 8 batches of 2).
        let per_batch = (self.options.concurrency.max(1) / lanes)
            .min(jobs.len().div_ceil(lanes))
            .max(1);
        let share = (self.budget.units / lanes as u64).max(1);
        let mut batches = Vec::new();
        let (mut start, mut cost) = (0, 0u64);
        for (i, (meta, _)) in jobs.iter().enumerate() {
            let doc_cost = Budget::cost([*meta]);
            if i > start && (i - start >= per_batch || cost + doc_cost > share) {
                batches.push(&jobs[start..i]);
                (start, cost) = (i, 0);
            }
            cost += doc_cost;
        }
        if start < jobs.len() {
            batches.push(&jobs[start..]);
        }
        batches
    }

    /// Copies one batch: reads it from the source (one `get_many`),
    /// checks each document is still the version planned, writes it to
    /// the target (one `put_many`, each document on its own condition),
    /// and verifies each copy: by the version the target returned where
    /// it proves the bytes (see [`proven_by_version`]), otherwise by
    /// reading the copies back (one `get_many`) and comparing SHA-256.
    async fn copy_batch(
        &self,
        batch: &[(&DocMeta, PutMode)],
        source: &HeldLease<'_>,
        target: &HeldLease<'_>,
    ) -> Result<Copied> {
        let _permit = self
            .budget
            .take(Budget::cost(batch.iter().map(|(meta, _)| *meta)), self.run)
            .await?;
        source.current()?;
        let names: Vec<DocName> = batch.iter().map(|(meta, _)| meta.name.clone()).collect();
        let read = self
            .source
            .get_many(self.run, &names, GetOptions::new())
            .await?;
        check_answers(read.len(), names.len(), self.run)?;
        let mut puts = Vec::with_capacity(batch.len());
        let mut expected = Vec::with_capacity(batch.len());
        for ((meta, mode), read) in batch.iter().zip(read) {
            let doc = read
                .map_err(|e| naming(e, &meta.name))?
                .filter(|d| d.version == meta.version)
                .ok_or_else(|| {
                    migrate_error(
                        ErrorKind::Precondition,
                        "the source document changed or vanished during the migration (a \
                         writer that does not take the run's lock?); run the migration again"
                            .into(),
                        self.run,
                    )
                    .with_doc(&meta.name)
                })?;
            expected.push(doc.bytes.clone());
            puts.push(PutRequest::new(meta.name.clone(), doc.bytes, mode.clone()));
        }
        // Not fenced: `Create` (or `Update` of the version the plan saw) is
        // already conditional, so nothing saved meanwhile by anyone else can
        // be overwritten, and a fence check would cost a round trip per
        // document on some backends. The target lease still keeps writers
        // that lock out.
        target.current()?;
        let written = self.target.put_many(self.run, puts).await?;
        check_answers(written.len(), names.len(), self.run)?;
        let mut copied = Copied::default();
        let mut unproven = Vec::new();
        for (((meta, _), written), bytes) in batch.iter().zip(written).zip(&expected) {
            let version = written.map_err(|e| naming(e, &meta.name))?;
            copied.bytes += bytes.len() as u64;
            if proven_by_version(self.target, &version, bytes) {
                copied.by_md5 += 1;
            } else {
                // Hashed only for a copy read back: one the target's
                // version proves (every copy into S3) needs no SHA-256.
                unproven.push((meta.name.clone(), sha256_hex(bytes)));
            }
        }
        if !unproven.is_empty() {
            let names: Vec<DocName> = unproven.iter().map(|(name, _)| name.clone()).collect();
            let back = self
                .target
                .get_many(self.run, &names, GetOptions::new())
                .await?;
            check_answers(back.len(), names.len(), self.run)?;
            for ((name, sha), back) in unproven.iter().zip(back) {
                let actual = back
                    .map_err(|e| naming(e, name))?
                    .map(|d| sha256_hex(&d.bytes));
                if actual.as_ref() != Some(sha) {
                    return Err(migrate_error(
                        ErrorKind::Corrupt,
                        format!(
                            "the copy reads back {} (source sha256 {sha})",
                            actual.map_or_else(
                                || "absent".to_owned(),
                                |a| format!("with sha256 {a}")
                            )
                        ),
                        self.run,
                    )
                    .with_doc(name));
                }
            }
        }
        for (meta, _) in batch {
            self.progress.document_done(self.run, &meta.name, meta.size);
        }
        Ok(copied)
    }

    /// Lists both sides and compares the documents they share.
    async fn plan(&self) -> Result<Plan> {
        let source_docs = self.source.list_all_docs(self.run).await?;
        let target_docs = self.target.list_all_docs(self.run).await?;
        if source_docs.is_empty() && !self.resumable_move(&target_docs) {
            return Err(migrate_error(
                ErrorKind::NotFound,
                "the source has no such run".into(),
                self.run,
            ));
        }
        let mut on_target: BTreeMap<DocName, DocMeta> = target_docs
            .into_iter()
            .map(|meta| (meta.name.clone(), meta))
            .collect();
        let mut plan = Plan {
            resumed: source_docs.is_empty(),
            ..Plan::default()
        };
        // Same size: compared by their bytes, in batches.
        let mut candidates = Vec::new();
        for meta in &source_docs {
            match on_target.remove(&meta.name) {
                None => plan.create.push(meta.clone()),
                Some(there) if there.size != meta.size => {
                    plan.replace.push((meta.clone(), there.version));
                }
                Some(there) => candidates.push((meta.clone(), there.version)),
            }
        }
        let same = self.same_bytes(&candidates).await?;
        for ((meta, version), same) in candidates.into_iter().zip(same) {
            if same {
                plan.identical.push(meta);
            } else {
                plan.replace.push((meta, version));
            }
        }
        plan.replace.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        plan.extra = on_target
            .into_values()
            .map(|meta| (meta.name, meta.version))
            .collect();
        plan.source = source_docs;
        Ok(plan)
    }

    /// An empty source run is only acceptable as the end of a move that
    /// was interrupted after deleting from the source.
    fn resumable_move(&self, target_docs: &[DocMeta]) -> bool {
        self.options.delete_source && !target_docs.is_empty()
    }

    /// Whether each source document has the same bytes on the target
    /// (compared by SHA-256), read in batches on both sides within the
    /// memory budget.
    async fn same_bytes(&self, candidates: &[(DocMeta, Version)]) -> Result<Vec<bool>> {
        let mut same = Vec::with_capacity(candidates.len());
        let share = (self.budget.units / LANES as u64).max(1);
        let mut rest = candidates;
        while !rest.is_empty() {
            let mut take = 0;
            let mut cost = 0;
            for (meta, _) in rest {
                let doc_cost = Budget::cost([meta]);
                if take > 0 && (take >= MAX_BATCH || cost + doc_cost > share) {
                    break;
                }
                (take, cost) = (take + 1, cost + doc_cost);
            }
            let (chunk, after) = rest.split_at(take);
            rest = after;
            let _permit = self.budget.take(cost, self.run).await?;
            let names: Vec<DocName> = chunk.iter().map(|(meta, _)| meta.name.clone()).collect();
            let a = self
                .source
                .get_many(self.run, &names, GetOptions::new())
                .await?;
            check_answers(a.len(), names.len(), self.run)?;
            // Each source document is reduced to its digest before the
            // target's copies are read.
            let a: Vec<Option<String>> = names
                .iter()
                .zip(a)
                .map(|(name, a)| {
                    a.map(|d| d.map(|d| sha256_hex(&d.bytes)))
                        .map_err(|e| naming(e, name))
                })
                .collect::<Result<_>>()?;
            let b = self
                .target
                .get_many(self.run, &names, GetOptions::new())
                .await?;
            check_answers(b.len(), names.len(), self.run)?;
            for ((name, a), b) in names.iter().zip(a).zip(b) {
                let b = b
                    .map_err(|e| naming(e, name))?
                    .map(|d| sha256_hex(&d.bytes));
                same.push(a.is_some() && a == b);
            }
        }
        Ok(same)
    }

    /// Refuses a target run the migration must not touch.
    fn check_plan(&self, plan: &Plan) -> Result<()> {
        if self.options.overwrite {
            return Ok(());
        }
        if let Some((meta, _)) = plan.replace.first() {
            return Err(migrate_error(
                ErrorKind::AlreadyExists,
                format!(
                    "the target run already holds {} document(s) that differ from the source \
                     (first: {}); pass --overwrite to replace them",
                    plan.replace.len(),
                    meta.name
                ),
                self.run,
            ));
        }
        // A move interrupted while deleting from the source leaves target
        // documents the source no longer has, and every document it still
        // has already identical on the target: only that is resumed.
        let resumed_move =
            self.options.delete_source && plan.create.is_empty() && plan.replace.is_empty();
        if let Some((name, _)) = plan.extra.first()
            && !resumed_move
        {
            return Err(migrate_error(
                ErrorKind::AlreadyExists,
                format!(
                    "the target run already holds {} document(s) the source does not have \
                     (first: {name}); pass --overwrite to delete them",
                    plan.extra.len()
                ),
                self.run,
            ));
        }
        Ok(())
    }

    fn report(&self, plan: &Plan, copied_bytes: u64) -> RunReport {
        let dry = self.options.dry_run;
        let planned_bytes: u64 = plan.create.iter().map(|m| m.size).sum::<u64>()
            + plan.replace.iter().map(|(m, _)| m.size).sum::<u64>();
        RunReport {
            run: Some(self.run.clone()),
            documents: plan.source.len() as u64,
            bytes: plan.source.iter().map(|m| m.size).sum(),
            copied: plan.create.len() as u64,
            copied_bytes: if dry { planned_bytes } else { copied_bytes },
            identical: plan.identical.len() as u64,
            replaced: plan.replace.len() as u64,
            removed: if self.options.overwrite && !self.options.delete_source {
                plan.extra.len() as u64
            } else {
                0
            },
            verified: if dry {
                plan.identical.len() as u64
            } else {
                (plan.identical.len() + plan.create.len() + plan.replace.len()) as u64
            },
            verified_by_md5: 0,
            source_deleted: false,
            milestones: 0,
        }
    }
}

/// Documents compared in one batch of a plan at most.
const MAX_BATCH: usize = 64;

/// A batch must answer once per document; a store that does not is broken.
fn check_answers(answers: usize, asked: usize, run: &RunId) -> Result<()> {
    if answers == asked {
        return Ok(());
    }
    Err(migrate_error(
        ErrorKind::Backend,
        format!("the store answered {answers} of {asked} documents of a batch"),
        run,
    ))
}

/// Budget units are KiB, so a `u32` of permits covers 4 TiB.
fn units(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// Compares runs of two stores document by document, by size and then by
/// SHA-256 of the bytes. Without locks: a run written during the comparison
/// may show differences that a second run does not.
///
/// # Errors
/// [`ErrorKind::NotFound`] for a named run neither store has; backend
/// errors. Differences are not errors, they are in the report.
pub async fn verify(
    source: &dyn Store,
    target: &dyn Store,
    selection: &Selection,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let named = matches!(selection, Selection::Runs(_));
    let runs = match selection.named_runs() {
        Some(runs) => runs,
        None => {
            let mut all = source.list_all_runs().await?;
            all.extend(target.list_all_runs().await?);
            all.sort();
            all.dedup();
            all
        }
    };
    progress.runs(runs.len());
    let mut report = VerifyReport::default();
    for run in &runs {
        verify_run(source, target, run, named, progress, &mut report)
            .await
            .map_err(|e| with_run_context(e, run, Operation::Verify))?;
        report.runs += 1;
        progress.run_finished(run);
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn verify_run(
    source: &dyn Store,
    target: &dyn Store,
    run: &RunId,
    named: bool,
    progress: &dyn Progress,
    report: &mut VerifyReport,
) -> Result<()> {
    let source_docs = source.list_all_docs(run).await?;
    let mut on_target: BTreeMap<DocName, DocMeta> = target
        .list_all_docs(run)
        .await?
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    if named && source_docs.is_empty() && on_target.is_empty() {
        return Err(
            Error::new(ErrorKind::NotFound, "neither store has this run")
                .at_run(Operation::Verify, run),
        );
    }
    progress.run_started(
        run,
        source_docs.len(),
        source_docs.iter().map(|m| m.size).sum(),
    );
    let mut shared = Vec::new();
    for meta in source_docs {
        match on_target.remove(&meta.name) {
            Some(_) => shared.push(meta),
            None => report.differences.push(Difference::MissingOnTarget {
                run: run.clone(),
                doc: meta.name,
            }),
        }
    }
    // Compared in batches (one `get_many` on each side), up to eight at
    // once, within the migration's default memory budget; in each batch
    // the source documents are reduced to their digests before the
    // target's are read.
    let budget = Budget::new(DEFAULT_MEMORY_BUDGET);
    let share = (budget.units / LANES as u64).max(1);
    let mut batches = Vec::new();
    let (mut start, mut cost) = (0, 0u64);
    for (i, meta) in shared.iter().enumerate() {
        let doc_cost = Budget::cost([meta]);
        if i > start && (i - start >= MAX_BATCH || cost + doc_cost > share) {
            batches.push(&shared[start..i]);
            (start, cost) = (i, 0);
        }
        cost += doc_cost;
    }
    if start < shared.len() {
        batches.push(&shared[start..]);
    }
    let mut batches = batches.into_iter();
    let mut running = FuturesOrdered::new();
    let mut compared = Vec::new();
    loop {
        while running.len() < LANES {
            let Some(batch) = batches.next() else {
                break;
            };
            running.push_back(compare_batch(source, target, run, batch, &budget, progress));
        }
        match running.next().await {
            Some(outcome) => compared.extend(outcome?),
            None => break,
        }
    }
    for (doc, size, differs) in compared {
        report.documents += 1;
        report.bytes += size;
        if let Some((source_sha256, target_sha256)) = differs {
            report.differences.push(Difference::Differs {
                run: run.clone(),
                doc,
                source_sha256,
                target_sha256,
            });
        }
    }
    for doc in on_target.into_keys() {
        report.differences.push(Difference::OnlyOnTarget {
            run: run.clone(),
            doc,
        });
    }
    Ok(())
}

/// Reads a batch of documents on both sides (one `get_many` each): for
/// each, its name, its source size, and the two digests when they differ.
async fn compare_batch(
    source: &dyn Store,
    target: &dyn Store,
    run: &RunId,
    batch: &[DocMeta],
    budget: &Budget,
    progress: &dyn Progress,
) -> Result<Vec<(DocName, u64, Option<(String, String)>)>> {
    let _permit = budget.take(Budget::cost(batch), run).await?;
    let names: Vec<DocName> = batch.iter().map(|meta| meta.name.clone()).collect();
    let a = source.get_many(run, &names, GetOptions::new()).await?;
    check_answers(a.len(), names.len(), run)?;
    let a: Vec<(u64, String)> = names
        .iter()
        .zip(a)
        .map(|(name, a)| {
            let a = a.map_err(|e| naming(e, name))?;
            let size = a.as_ref().map_or(0, |d| d.bytes.len() as u64);
            Ok((size, digest_of(a.map(|d| d.bytes))))
        })
        .collect::<Result<_>>()?;
    let b = target.get_many(run, &names, GetOptions::new()).await?;
    check_answers(b.len(), names.len(), run)?;
    let mut compared = Vec::with_capacity(names.len());
    for ((name, (size, a)), b) in names.into_iter().zip(a).zip(b) {
        let b = digest_of(b.map_err(|e| naming(e, &name))?.map(|d| d.bytes));
        progress.document_done(run, &name, size);
        compared.push((name, size, (a != b).then_some((a, b))));
    }
    Ok(compared)
}

/// The digest of a document, or `absent` for one deleted since listing.
fn digest_of(bytes: Option<Bytes>) -> String {
    bytes.map_or_else(|| "absent".to_owned(), |b| sha256_hex(&b))
}
