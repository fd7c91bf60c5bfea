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
//! a silently stale copy; running it again copies the change.
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
//! own lock too and only if it is still the version copied. A move
//! interrupted while deleting resumes: the target may then hold documents
//! the source no longer has, which is accepted only when every document the
//! source still has is already identical on the target; such documents are
//! never deleted from the target, even with `overwrite`, since they may be
//! the only copies left.
//!
//! Runs are streamed document by document: at most
//! [`concurrency`](MigrateOptions::concurrency) documents, of at most
//! [`memory_budget`](MigrateOptions::memory_budget) bytes together (a
//! larger document goes alone), are in memory at once. A failed copy stops
//! the run after the copies in flight have finished, so no write lands
//! after the migration has returned.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use runstate_core::{
    DocMeta, DocName, Error, ErrorKind, GetOptions, Lease, Lock, LockExt, LockKey, Operation,
    Owner, PutMode, PutOptions, Result, RunId, Store, StoreExt, Version, WaitPolicy,
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
    /// Documents copied at the same time.
    pub concurrency: usize,
    /// Bytes of documents in memory at the same time (each document counts
    /// twice: its source bytes and the copy read back to verify it).
    pub memory_budget: u64,
}

/// Default of [`MigrateOptions::concurrency`].
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Default of [`MigrateOptions::memory_budget`]: 32 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 32 * 1024 * 1024;

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
    /// Documents whose target bytes were read back and matched by SHA-256.
    pub verified: u64,
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
    /// Documents found already identical on the target.
    pub identical: u64,
    /// Wall time.
    pub elapsed_secs: f64,
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
/// documentation](self) for the guarantees). Runs are processed one after
/// the other; the first run that fails stops the migration, and running it
/// again resumes.
///
/// # Errors
/// [`ErrorKind::AlreadyExists`] when a target run holds documents that
/// differ from the source (or that the source lacks) and `overwrite` is
/// off; [`ErrorKind::NotFound`] for a selected run the source does not
/// have; [`ErrorKind::Locked`] when a run stays locked longer than the
/// wait policy; [`ErrorKind::Precondition`] when the source changed during
/// the copy; [`ErrorKind::Corrupt`] when a document reads back different;
/// backend errors. Every error names the run (and the document).
pub async fn migrate(
    source: &dyn Lock,
    target: &dyn Lock,
    options: &MigrateOptions,
    progress: &dyn Progress,
) -> Result<MigrationReport> {
    let started = Instant::now();
    let runs = match &options.selection {
        Selection::Runs(runs) => distinct(runs),
        Selection::All => source.list_all_runs().await?,
    };
    progress.runs(runs.len());
    let mut report = MigrationReport {
        dry_run: options.dry_run,
        ..MigrationReport::default()
    };
    for run in &runs {
        let outcome = Migration {
            source,
            target,
            options,
            progress,
            run,
        }
        .run()
        .await
        .map_err(|e| with_run_context(e, run, Operation::Migrate))?;
        report.documents += outcome.copied + outcome.replaced;
        report.bytes += outcome.copied_bytes;
        report.verified += outcome.verified;
        report.identical += outcome.identical;
        report.runs.push(outcome);
        progress.run_finished(run);
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The runs in their first order, each once: a run named twice must not be
/// migrated twice (the second pass would see a finished move).
fn distinct(runs: &[RunId]) -> Vec<RunId> {
    let mut seen = std::collections::BTreeSet::new();
    runs.iter().filter(|r| seen.insert(*r)).cloned().collect()
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

fn migrate_error(kind: ErrorKind, message: String, run: &RunId) -> Error {
    Error::new(kind, message)
        .with_operation(Operation::Migrate)
        .with_run(run)
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
            LeaseState::Held(lease) => Err(Error::new(
                ErrorKind::LeaseLost,
                format!("the migration's lease on {} expired", lease.key()),
            )
            .with_operation(Operation::Migrate)),
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

    /// Extends the lease by its TTL; a refusal marks it lost.
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
                *self.state() = LeaseState::Lost(error.to_string());
                Err(error)
            }
        }
    }

    /// Releases the lease if it is held; a lease already lost is only
    /// logged, because the final source check has proven the copy.
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

/// Renews both leases every third of their TTL until `done` is notified,
/// so that no single slow step (a long plan, a wait for the target lock, a
/// large document) lets them expire. A refused renewal stops it; the next
/// step of the migration then fails with `LeaseLost`.
async fn keep_alive(leases: [&HeldLease<'_>; 2], ttl: Duration, done: &Notify) {
    loop {
        tokio::select! {
            () = done.notified() => return,
            () = tokio::time::sleep(ttl / 3) => {}
        }
        for lease in leases {
            if lease.renew().await.is_err() {
                return;
            }
        }
    }
}

struct Migration<'a> {
    source: &'a dyn Lock,
    target: &'a dyn Lock,
    options: &'a MigrateOptions,
    progress: &'a dyn Progress,
    run: &'a RunId,
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

        let budget_units = units(self.options.memory_budget);
        let budget = Semaphore::new(usize::try_from(budget_units).unwrap_or(usize::MAX));
        let jobs = plan
            .create
            .iter()
            .map(|meta| (meta, PutMode::Create))
            .chain(
                plan.replace
                    .iter()
                    .map(|(meta, version)| (meta, PutMode::Update(version.clone()))),
            );
        // A loop over `FuturesUnordered` rather than stream combinators with
        // closures: those make the future lose `Send` for borrowed inputs,
        // and a migration must be spawnable.
        // After a failure the copies in flight are awaited, not dropped:
        // dropping a future does not stop a write the server (or a blocking
        // thread) already has, and none may land after the leases are gone.
        let mut jobs = jobs;
        let mut running = FuturesUnordered::new();
        let mut copied_bytes = 0u64;
        let mut failure = None;
        loop {
            while failure.is_none() && running.len() < self.options.concurrency.max(1) {
                let Some((meta, mode)) = jobs.next() else {
                    break;
                };
                let budget = &budget;
                running.push(async move {
                    self.copy_one(meta, mode, source, target, budget, budget_units)
                        .await
                        .map_err(|e| {
                            if e.doc().is_none() {
                                e.with_doc(&meta.name)
                            } else {
                                e
                            }
                        })
                });
            }
            match running.next().await {
                Some(Ok(copied)) => copied_bytes += copied,
                Some(Err(error)) => {
                    failure.get_or_insert(error);
                }
                None => break,
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }

        let milestones = self.copy_milestones(target).await?;

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
        let unchanged = now.len() == plan.source.len()
            && now
                .iter()
                .zip(&plan.source)
                .all(|(a, b)| a.name == b.name && a.version == b.version);
        if !unchanged {
            return Err(migrate_error(
                ErrorKind::Precondition,
                format!(
                    "the source run changed during the migration (a writer that does not take \
                     the run's lock?): it listed {} documents before and {} after; run the \
                     migration again",
                    plan.source.len(),
                    now.len()
                ),
                self.run,
            ));
        }

        let mut report = self.report(&plan, copied_bytes);
        report.milestones = milestones;
        if self.options.delete_source {
            for meta in &plan.source {
                self.delete_source_doc(meta, source).await?;
            }
            report.source_deleted = true;
        }
        Ok(report)
    }

    /// Copies the run's milestones and attributes (a field at a time, as
    /// they are written) where the target lacks them or holds another
    /// value; returns how many were set. Nothing to copy when the source
    /// keeps none; a target that cannot keep them while the source has
    /// some fails the run, rather than dropping them silently.
    async fn copy_milestones(&self, target: &HeldLease<'_>) -> Result<u64> {
        if !self.source.capabilities().milestones {
            return Ok(0);
        }
        let from = self.source.milestones(self.run).await?;
        if from.timestamps.is_empty() && from.attrs.is_empty() {
            return Ok(0);
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
            if there.timestamps.get(task) != Some(at) {
                target.current()?;
                self.target.mark(self.run, task, *at).await?;
                set += 1;
            }
        }
        for (name, value) in &from.attrs {
            if there.attrs.get(name) != Some(value) {
                target.current()?;
                self.target.set_attr(self.run, name, value).await?;
                set += 1;
            }
        }
        Ok(set)
    }

    /// Deletes one verified source document under its own lock as well as
    /// the run's (writers that lock only the document are kept out too),
    /// and only if it is still the version that was copied: conditionally
    /// where the backend can, else checked just before under that lock.
    async fn delete_source_doc(&self, meta: &DocMeta, source: &HeldLease<'_>) -> Result<()> {
        source.current()?;
        let options = self.options;
        let key = LockKey::Doc(self.run.clone(), meta.name.clone());
        let lease = self
            .source
            .acquire(&key, &options.owner, options.ttl, &options.wait)
            .await?;
        let outcome = async {
            if self.source.capabilities().conditional_delete {
                return self
                    .source
                    .delete(self.run, &meta.name, Some(&meta.version))
                    .await;
            }
            let now = self
                .source
                .get(self.run, &meta.name, GetOptions::new())
                .await?;
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

    /// Copies one document, reads it back and compares hashes; returns its
    /// size.
    async fn copy_one(
        &self,
        meta: &DocMeta,
        mode: PutMode,
        source: &HeldLease<'_>,
        target: &HeldLease<'_>,
        budget: &Semaphore,
        budget_units: u64,
    ) -> Result<u64> {
        let cost = units(meta.size.saturating_mul(2)).clamp(1, budget_units);
        let _permit = budget
            .acquire_many(u32::try_from(cost).unwrap_or(u32::MAX))
            .await
            .map_err(|e| {
                migrate_error(ErrorKind::Backend, "memory budget closed".into(), self.run)
                    .with_source(e)
            })?;
        source.current()?;
        let doc = self
            .source
            .get(self.run, &meta.name, GetOptions::new())
            .await?
            .filter(|d| d.version == meta.version)
            .ok_or_else(|| {
                migrate_error(
                    ErrorKind::Precondition,
                    "the source document changed or vanished during the migration (a writer \
                     that does not take the run's lock?); run the migration again"
                        .into(),
                    self.run,
                )
                .with_doc(&meta.name)
            })?;
        let size = doc.bytes.len() as u64;
        let expected = sha256_hex(&doc.bytes);
        // Not fenced: `Create` (or `Update` of the version the plan saw) is
        // already conditional, so nothing saved meanwhile by anyone else can
        // be overwritten, and a fence check would cost a round trip per
        // document on some backends. The target lease still keeps writers
        // that lock out.
        target.current()?;
        self.target
            .put(self.run, &meta.name, doc.bytes, PutOptions::mode(mode))
            .await?;
        let back = self
            .target
            .get(self.run, &meta.name, GetOptions::new())
            .await?;
        let actual = back.as_ref().map(|d| sha256_hex(&d.bytes));
        if actual.as_deref() != Some(expected.as_str()) {
            return Err(migrate_error(
                ErrorKind::Corrupt,
                format!(
                    "the copy reads back {} (source sha256 {expected})",
                    actual.map_or_else(|| "absent".to_owned(), |a| format!("with sha256 {a}"))
                ),
                self.run,
            )
            .with_doc(&meta.name));
        }
        self.progress.document_done(self.run, &meta.name, size);
        Ok(size)
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
        let mut plan = Plan::default();
        for meta in &source_docs {
            match on_target.remove(&meta.name) {
                None => plan.create.push(meta.clone()),
                Some(there) => {
                    if self.same_bytes(meta, &there).await? {
                        plan.identical.push(meta.clone());
                    } else {
                        plan.replace.push((meta.clone(), there.version));
                    }
                }
            }
        }
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

    async fn same_bytes(&self, source: &DocMeta, target: &DocMeta) -> Result<bool> {
        if source.size != target.size {
            return Ok(false);
        }
        let a = self
            .source
            .get(self.run, &source.name, GetOptions::new())
            .await?;
        let b = self
            .target
            .get(self.run, &target.name, GetOptions::new())
            .await?;
        Ok(match (a, b) {
            (Some(a), Some(b)) => sha256_hex(&a.bytes) == sha256_hex(&b.bytes),
            _ => false,
        })
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
            source_deleted: false,
            milestones: 0,
        }
    }
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
    let runs = match selection {
        Selection::Runs(runs) => distinct(runs),
        Selection::All => {
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
                .with_operation(Operation::Verify)
                .with_run(run),
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
    // One document of each comparison is in memory at a time (the first
    // is reduced to its digest before the second is read), and the
    // comparisons in flight share the migration's memory budget.
    let budget_units = units(DEFAULT_MEMORY_BUDGET);
    let budget = Semaphore::new(usize::try_from(budget_units).unwrap_or(usize::MAX));
    let mut shared = shared.into_iter();
    let mut running = FuturesOrdered::new();
    let mut compared = Vec::new();
    loop {
        while running.len() < DEFAULT_CONCURRENCY {
            let Some(meta) = shared.next() else {
                break;
            };
            let budget = &budget;
            running.push_back(async move {
                let cost = units(meta.size).clamp(1, budget_units);
                let _permit = budget
                    .acquire_many(u32::try_from(cost).unwrap_or(u32::MAX))
                    .await
                    .map_err(|e| {
                        Error::new(ErrorKind::Backend, "memory budget closed").with_source(e)
                    })?;
                compare_one(source, target, run, meta.name, progress).await
            });
        }
        match running.next().await {
            Some(outcome) => compared.push(outcome?),
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

/// Reads one document on both sides: its name, its source size, and the
/// two digests when they differ.
async fn compare_one(
    source: &dyn Store,
    target: &dyn Store,
    run: &RunId,
    doc: DocName,
    progress: &dyn Progress,
) -> Result<(DocName, u64, Option<(String, String)>)> {
    let a = source.get(run, &doc, GetOptions::new()).await?;
    let size = a.as_ref().map_or(0, |d| d.bytes.len() as u64);
    let a = digest_of(a.map(|d| d.bytes));
    let b = digest_of(
        target
            .get(run, &doc, GetOptions::new())
            .await?
            .map(|d| d.bytes),
    );
    progress.document_done(run, &doc, size);
    Ok((doc, size, (a != b).then_some((a, b))))
}

/// The digest of a document, or `absent` for one deleted since listing.
fn digest_of(bytes: Option<Bytes>) -> String {
    bytes.map_or_else(|| "absent".to_owned(), |b| sha256_hex(&b))
}
