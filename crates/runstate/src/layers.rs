//! Layers that watch every call without changing it: [`Observed`] wraps a
//! store and tells an [`Observer`] about each call (what, on what, how it
//! ended, how long it took). Three observers come with runstate:
//!
//! - [`Tracing`]: one `tracing` span per operation (backend, operation,
//!   run, document, fence, bytes, outcome, duration), so a backend's own
//!   events (probe failures, sweeps, lapsed renewals) appear inside it;
//! - `Metrics` (cargo feature `metrics`): counters and latency histograms
//!   per backend, operation and outcome, on the `metrics` crate;
//! - [`Health`]: what [`AnyStore::health`](crate::AnyStore::health) and
//!   `runstate health` report: ok / degraded / failing, the last error,
//!   p50/p99 latency per operation, calls in flight, failed lease renewals.
//!
//! A layer forwards **every** method of [`Store`] and [`Lock`] to the same
//! method of the store it wraps (checked by `clippy::missing_trait_methods`),
//! so a backend's combined operations (`acquire_and_load`,
//! `save_and_release`, one round trip each) are never split into two by a
//! default method.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> runstate::Result<()> {
//! use std::sync::Arc;
//! use runstate::layers::{Observed, Tracing};
//! use runstate::memory::MemoryStore;
//! let store = Observed::new(Arc::new(MemoryStore::new()), Tracing);
//! # let _ = store; Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use runstate_core::time::Short;
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode, PutOptions,
    PutRequest, Replay, Result, RunId, Store, StoredDoc, Subscription, Version, Watcher,
    async_trait,
};
use tracing::Instrument;

/// What a layer knows of a call before it runs.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Call<'a> {
    /// The backend's name.
    pub backend: &'static str,
    /// The operation.
    pub operation: Operation,
    /// The run, when the call names one.
    pub run: Option<&'a RunId>,
    /// The document, when the call names one.
    pub doc: Option<&'a DocName>,
    /// The fence of the lease involved, if any.
    pub fence: Option<Fence>,
    /// Bytes sent (a save), if any.
    pub bytes: Option<u64>,
}

/// How a call ended.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Ended<'a> {
    /// The error, when it failed.
    pub error: Option<&'a Error>,
    /// Bytes received (a read), if any.
    pub bytes: Option<u64>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Ended<'_> {
    /// `ok`, or the error kind as a short word (`locked`, `fenced`, …).
    pub fn outcome(&self) -> &'static str {
        match self.error {
            None => "ok",
            Some(e) => e.kind().as_str(),
        }
    }
}

/// Told about every call of an [`Observed`] store.
pub trait Observer: Send + Sync + fmt::Debug + 'static {
    /// Called before the call runs; the span returned (if any) is entered
    /// while it runs.
    fn begin(&self, call: &Call<'_>) -> Option<tracing::Span> {
        let _ = call;
        None
    }

    /// Called when it ended.
    fn end(&self, call: &Call<'_>, ended: &Ended<'_>, span: Option<&tracing::Span>);
}

/// Ends a call for its observer if it is dropped before it ended.
struct Pending<'a, O: Observer> {
    observer: &'a O,
    call: &'a Call<'a>,
    span: Option<&'a tracing::Span>,
    started: Instant,
    armed: bool,
}

impl<O: Observer> Drop for Pending<'_, O> {
    fn drop(&mut self) {
        if self.armed {
            let cancelled =
                Error::new(ErrorKind::Backend, "the call was cancelled before it ended");
            let ended = Ended {
                error: Some(&cancelled),
                bytes: None,
                elapsed: self.started.elapsed(),
            };
            self.observer.end(self.call, &ended, self.span);
        }
    }
}

/// Two observers at once (the first one's span is the call's).
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn begin(&self, call: &Call<'_>) -> Option<tracing::Span> {
        let span = self.0.begin(call);
        let other = self.1.begin(call);
        span.or(other)
    }

    fn end(&self, call: &Call<'_>, ended: &Ended<'_>, span: Option<&tracing::Span>) {
        self.0.end(call, ended, span);
        self.1.end(call, ended, span);
    }
}

/// Sizes of results, for [`Ended::bytes`].
trait Received {
    fn received(&self) -> Option<u64> {
        None
    }
}

impl Received for Option<StoredDoc> {
    fn received(&self) -> Option<u64> {
        self.as_ref().map(|d| d.bytes.len() as u64)
    }
}
impl Received for (Lease, Option<StoredDoc>) {
    fn received(&self) -> Option<u64> {
        self.1.received()
    }
}
impl Received for Fetched {
    fn received(&self) -> Option<u64> {
        match self {
            Fetched::Changed(d) => Some(d.bytes.len() as u64),
            _ => Some(0),
        }
    }
}
impl Received for Version {}
impl Received for Option<DocStat> {}
impl Received for Vec<Result<Option<StoredDoc>>> {
    fn received(&self) -> Option<u64> {
        Some(
            self.iter()
                .filter_map(|r| r.as_ref().ok().and_then(Received::received))
                .sum(),
        )
    }
}
impl Received for Vec<Result<Version>> {}
impl Received for bool {}
impl Received for u64 {}
impl Received for () {}
impl Received for Lease {}
impl Received for Option<LockInfo> {}
impl Received for Vec<LockInfo> {}
impl Received for ListPage<DocMeta> {}
impl Received for ListPage<RunId> {}
impl Received for Watcher {}
impl Received for Subscription {}
impl Received for Milestones {}

/// A store with an observer watching each call (see the [module
/// documentation](self)).
pub struct Observed<O> {
    store: Arc<dyn Lock>,
    observer: O,
}

impl<O: Observer> Observed<O> {
    /// `store`, watched by `observer`.
    pub fn new(store: Arc<dyn Lock>, observer: O) -> Self {
        Observed { store, observer }
    }

    /// The observer.
    pub fn observer(&self) -> &O {
        &self.observer
    }

    /// The store it wraps.
    pub fn inner(&self) -> &Arc<dyn Lock> {
        &self.store
    }

    fn call<'a>(
        &self,
        operation: Operation,
        run: Option<&'a RunId>,
        doc: Option<&'a DocName>,
    ) -> Call<'a> {
        Call {
            backend: self.store.capabilities().backend,
            operation,
            run,
            doc,
            fence: None,
            bytes: None,
        }
    }

    async fn observe<T: Received>(
        &self,
        call: Call<'_>,
        future: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span = self.observer.begin(&call);
        let started = Instant::now();
        // A call dropped before it ended (a timeout around it) still ends
        // for the observer, as cancelled.
        let mut pending = Pending {
            observer: &self.observer,
            call: &call,
            span: span.as_ref(),
            started,
            armed: true,
        };
        let outcome = match &span {
            Some(span) => future.instrument(span.clone()).await,
            None => future.await,
        };
        pending.armed = false;
        let ended = Ended {
            error: outcome.as_ref().err(),
            bytes: outcome.as_ref().ok().and_then(Received::received),
            elapsed: started.elapsed(),
        };
        self.observer.end(&call, &ended, span.as_ref());
        outcome
    }
}

impl<O: Observer> fmt::Debug for Observed<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("store", &self.store)
            .field("observer", &self.observer)
            .finish()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<O: Observer> Store for Observed<O> {
    fn capabilities(&self) -> &Capabilities {
        self.store.capabilities()
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let call = self.call(Operation::Get, Some(run), Some(doc));
        self.observe(call, self.store.get(run, doc, options)).await
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        let mut call = self.call(Operation::Put, Some(run), Some(doc));
        call.bytes = Some(bytes.len() as u64);
        call.fence = options.lease.or(options.foreign_lease).map(Lease::fence);
        self.observe(call, self.store.put(run, doc, bytes, options))
            .await
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let call = self.call(Operation::Delete, Some(run), Some(doc));
        self.observe(call, self.store.delete(run, doc, if_version))
            .await
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let call = self.call(Operation::ListDocs, Some(run), None);
        self.observe(call, self.store.list_docs(run, after, limit))
            .await
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let call = self.call(Operation::ListRuns, None, None);
        self.observe(call, self.store.list_runs(after, limit)).await
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let call = self.call(Operation::DeleteRun, Some(run), None);
        self.observe(call, self.store.delete_run(run)).await
    }

    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let call = self.call(Operation::Head, Some(run), Some(doc));
        self.observe(call, self.store.head(run, doc)).await
    }

    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let call = self.call(Operation::GetMany, Some(run), None);
        self.observe(call, self.store.get_many(run, docs, options))
            .await
    }

    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        let mut call = self.call(Operation::PutMany, Some(run), None);
        call.bytes = Some(puts.iter().map(|p| p.bytes.len() as u64).sum());
        self.observe(call, self.store.put_many(run, puts)).await
    }

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let call = self.call(Operation::GetIfChanged, Some(run), Some(doc));
        self.observe(call, self.store.get_if_changed(run, doc, known, options))
            .await
    }

    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let mut call = self.call(Operation::Claim, Some(key.run()), doc.or(key.doc()));
        call.fence = Some(fence);
        self.observe(call, self.store.claim(key, fence, doc, options))
            .await
    }

    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        let call = self.call(Operation::Watch, Some(run), None);
        self.observe(call, self.store.watch(run)).await
    }

    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let mut call = self.call(Operation::Publish, Some(run), None);
        call.bytes = Some(text.len() as u64);
        self.observe(call, self.store.publish(run, topic, text))
            .await
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        let call = self.call(Operation::Subscribe, Some(run), None);
        self.observe(call, self.store.subscribe(run, replay)).await
    }

    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let call = self.call(Operation::Mark, Some(run), None);
        self.observe(call, self.store.mark(run, task, at)).await
    }

    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let call = self.call(Operation::SetAttr, Some(run), None);
        self.observe(call, self.store.set_attr(run, name, value))
            .await
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let call = self.call(Operation::Milestones, Some(run), None);
        self.observe(call, self.store.milestones(run)).await
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<O: Observer> Lock for Observed<O> {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        let call = self.call(Operation::Acquire, Some(key.run()), key.doc());
        self.observe(call, self.store.try_acquire(key, owner, ttl))
            .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let mut call = self.call(Operation::Renew, Some(lease.key().run()), lease.key().doc());
        call.fence = Some(lease.fence());
        self.observe(call, self.store.renew(lease, ttl)).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let mut call = self.call(
            Operation::Release,
            Some(lease.key().run()),
            lease.key().doc(),
        );
        call.fence = Some(lease.fence());
        self.observe(call, self.store.release(lease)).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let call = self.call(Operation::Inspect, Some(key.run()), key.doc());
        self.observe(call, self.store.inspect(key)).await
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let mut call = self.call(Operation::BreakLock, Some(key.run()), key.doc());
        call.fence = only_fence;
        self.observe(call, self.store.break_lock(key, only_fence))
            .await
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let call = self.call(Operation::ListLocks, run, None);
        self.observe(call, self.store.list_locks(run)).await
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        // Waiting is not a call of the backend's; nothing to observe.
        self.store.wait_for_release(key, max).await;
    }

    async fn wait_for_local_release(&self, key: &LockKey, owner: &Owner, max: Duration) -> bool {
        // Nor is this one.
        self.store.wait_for_local_release(key, owner, max).await
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let call = self.call(Operation::AcquireAndLoad, Some(key.run()), Some(doc));
        self.observe(
            call,
            self.store.acquire_and_load(key, doc, owner, ttl, options),
        )
        .await
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let mut call = self.call(
            Operation::SaveAndRelease,
            Some(lease.key().run()),
            Some(doc),
        );
        call.fence = Some(lease.fence());
        call.bytes = Some(bytes.len() as u64);
        self.observe(call, self.store.save_and_release(lease, doc, bytes, mode))
            .await
    }
}

/// One `tracing` span per call, at DEBUG (INFO would flood a busy
/// service), named `runstate`, with the fields `backend`, `operation`,
/// `run`, `doc`, `fence`, `bytes`, and, recorded when it ends, `outcome`,
/// `received` and `duration_us`. A failed call also emits an event: WARN
/// for failures of the backend, DEBUG for refusals that are part of the
/// contract (locked, fenced, precondition, …).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracing;

impl Observer for Tracing {
    fn begin(&self, call: &Call<'_>) -> Option<tracing::Span> {
        Some(tracing::debug_span!(
            "runstate",
            backend = call.backend,
            operation = call.operation.as_str(),
            run = call.run.map(RunId::as_str),
            doc = call.doc.map(DocName::as_str),
            fence = call.fence.map(Fence::get),
            bytes = call.bytes,
            outcome = tracing::field::Empty,
            received = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        ))
    }

    fn end(&self, _call: &Call<'_>, ended: &Ended<'_>, span: Option<&tracing::Span>) {
        if let Some(span) = span {
            span.record("outcome", ended.outcome());
            span.record("received", ended.bytes);
            span.record("duration_us", ended.elapsed.as_micros() as u64);
            let _entered = span.enter();
            match ended.error {
                Some(error) if is_failure(error) => tracing::warn!(%error, "runstate call failed"),
                Some(error) => tracing::debug!(%error, "runstate call refused"),
                None => {}
            }
        }
    }
}

/// Whether an error is a failure of the backend (as opposed to a refusal
/// the contract defines, which says the store works).
fn is_failure(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Backend | ErrorKind::Timeout | ErrorKind::Denied
    )
}

/// Counters and latency histograms on the `metrics` crate, labelled by
/// backend, operation and outcome: `runstate_calls_total`,
/// `runstate_call_seconds`, `runstate_bytes_sent_total`,
/// `runstate_bytes_received_total`. Install any `metrics` recorder
/// (Prometheus, StatsD, …) to collect them.
#[cfg(feature = "metrics")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics;

#[cfg(feature = "metrics")]
impl Observer for Metrics {
    fn end(&self, call: &Call<'_>, ended: &Ended<'_>, _span: Option<&tracing::Span>) {
        let labels = [
            ("backend", call.backend.to_owned()),
            ("operation", call.operation.as_str().to_owned()),
            ("outcome", ended.outcome().to_owned()),
        ];
        metrics::counter!("runstate_calls_total", &labels).increment(1);
        metrics::histogram!("runstate_call_seconds", &labels).record(ended.elapsed.as_secs_f64());
        if let Some(bytes) = call.bytes {
            metrics::counter!("runstate_bytes_sent_total", &labels).increment(bytes);
        }
        if let Some(bytes) = ended.bytes {
            metrics::counter!("runstate_bytes_received_total", &labels).increment(bytes);
        }
    }
}

/// Latencies kept per operation for the percentiles.
const SAMPLES: usize = 512;
/// Recent calls looked at to judge health.
const WINDOW: usize = 64;
/// How long a failed lease renewal keeps the store "degraded".
const RENEWAL_WINDOW: Duration = Duration::from_secs(300);

/// What [`Health`] learns from the calls it sees (see
/// [`HealthReport`]). Cheap to clone; clones share the figures.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    in_flight: AtomicI64,
    failed_renewals: AtomicU64,
    calls: AtomicU64,
    figures: Mutex<Figures>,
}

#[derive(Debug, Default)]
struct Figures {
    /// When recent lease renewals failed (kept for [`RENEWAL_WINDOW`]).
    renewal_failures: VecDeque<Instant>,
    latencies: HashMap<&'static str, VecDeque<Duration>>,
    /// Whether each of the most recent calls failed (true) or not.
    recent: VecDeque<bool>,
    last_error: Option<(SystemTime, String)>,
}

/// How a store is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthStatus {
    /// Calls succeed.
    Ok,
    /// Some recent calls failed, or a lease renewal did: it works, with
    /// trouble.
    Degraded,
    /// Most recent calls failed.
    Failing,
}

impl HealthStatus {
    /// `ok`, `degraded` or `failing`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "ok",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Failing => "failing",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Latency percentiles of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OperationLatency {
    /// The operation.
    pub operation: &'static str,
    /// Calls sampled.
    pub samples: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// A snapshot of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Ok, degraded or failing.
    pub status: HealthStatus,
    /// The last error, and when it happened (its message, secrets already
    /// kept out by the error type).
    pub last_error: Option<(SystemTime, String)>,
    /// Latency per operation, sorted by name.
    pub latency: Vec<OperationLatency>,
    /// Calls running now.
    pub in_flight: i64,
    /// Lease renewals that failed, in all (a holder at risk of losing its
    /// lock); those of the last five minutes make the status degraded.
    pub failed_renewals: u64,
    /// Calls seen in all.
    pub calls: u64,
}

impl HealthReport {
    /// The report of a store that could not be reached at all (opening it
    /// failed): failing, with `message` as the last error, now, and no
    /// calls. For monitors that read one form whatever happened.
    pub fn unreachable(message: impl Into<String>) -> HealthReport {
        HealthReport {
            status: HealthStatus::Failing,
            last_error: Some((SystemTime::now(), message.into())),
            latency: Vec::new(),
            in_flight: 0,
            failed_renewals: 0,
            calls: 0,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Serialized as an object for machines (what `runstate health --json`
/// prints): `status` (`"ok"`, `"degraded"`, `"failing"`), `last_error`
/// (`null` or `{"at": RFC 3339 UTC, "at_unix_ms", "message"}`), `calls`,
/// `in_flight`, `failed_renewals`, and `latency`, a list of
/// `{"operation", "samples", "p50_us", "p99_us"}` sorted by operation.
impl serde::Serialize for HealthReport {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;

        #[derive(serde::Serialize)]
        struct LastError<'a> {
            at: String,
            at_unix_ms: u64,
            message: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Latency {
            operation: &'static str,
            samples: usize,
            p50_us: u64,
            p99_us: u64,
        }

        let last_error = self.last_error.as_ref().map(|(at, message)| LastError {
            at: runstate_core::time::Utc(*at).to_string(),
            at_unix_ms: unix_millis(*at),
            message,
        });
        let latency: Vec<Latency> = self
            .latency
            .iter()
            .map(|l| Latency {
                operation: l.operation,
                samples: l.samples,
                p50_us: micros(l.p50),
                p99_us: micros(l.p99),
            })
            .collect();
        let mut out = serializer.serialize_struct("HealthReport", 6)?;
        out.serialize_field("status", self.status.as_str())?;
        out.serialize_field("last_error", &last_error)?;
        out.serialize_field("calls", &self.calls)?;
        out.serialize_field("in_flight", &self.in_flight)?;
        out.serialize_field("failed_renewals", &self.failed_renewals)?;
        out.serialize_field("latency", &latency)?;
        out.end()
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "status: {}", self.status)?;
        writeln!(
            f,
            "calls: {}, in flight: {}, failed lease renewals: {}",
            self.calls, self.in_flight, self.failed_renewals
        )?;
        match &self.last_error {
            Some((at, error)) => writeln!(
                f,
                "last error: {} at {}",
                error,
                runstate_core::time::Utc(*at)
            )?,
            None => writeln!(f, "last error: none")?,
        }
        for l in &self.latency {
            writeln!(
                f,
                "{:<18} p50 {:>8}  p99 {:>8}  ({} calls)",
                l.operation,
                Short(l.p50).to_string(),
                Short(l.p99).to_string(),
                l.samples
            )?;
        }
        Ok(())
    }
}

impl Health {
    /// No calls seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.inner
            .figures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The figures now.
    pub fn report(&self) -> HealthReport {
        let figures = self.figures();
        let failed = figures.recent.iter().filter(|f| **f).count();
        let seen = figures.recent.len();
        let renewals = self.inner.failed_renewals.load(Ordering::Relaxed);
        let recent_renewals = figures
            .renewal_failures
            .iter()
            .filter(|at| at.elapsed() <= RENEWAL_WINDOW)
            .count();
        let status = if seen > 0 && failed * 2 > seen {
            HealthStatus::Failing
        } else if failed > 0 || recent_renewals > 0 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Ok
        };
        let mut latency: Vec<OperationLatency> = figures
            .latencies
            .iter()
            .map(|(operation, samples)| {
                let mut sorted: Vec<Duration> = samples.iter().copied().collect();
                sorted.sort_unstable();
                let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
                OperationLatency {
                    operation,
                    samples: sorted.len(),
                    p50: at(0.5),
                    p99: at(0.99),
                }
            })
            .collect();
        latency.sort_by_key(|l| l.operation);
        HealthReport {
            status,
            last_error: figures.last_error.clone(),
            latency,
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            failed_renewals: renewals,
            calls: self.inner.calls.load(Ordering::Relaxed),
        }
    }
}

impl Observer for Health {
    fn begin(&self, _call: &Call<'_>) -> Option<tracing::Span> {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn end(&self, call: &Call<'_>, ended: &Ended<'_>, _span: Option<&tracing::Span>) {
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let failed = ended.error.is_some_and(is_failure);
        let renewal_failed = call.operation == Operation::Renew && ended.error.is_some();
        if renewal_failed {
            self.inner.failed_renewals.fetch_add(1, Ordering::Relaxed);
        }
        let mut figures = self.figures();
        if renewal_failed {
            figures.renewal_failures.push_back(Instant::now());
        }
        while figures
            .renewal_failures
            .front()
            .is_some_and(|at| at.elapsed() > RENEWAL_WINDOW)
        {
            figures.renewal_failures.pop_front();
        }
        let samples = figures
            .latencies
            .entry(call.operation.as_str())
            .or_default();
        samples.push_back(ended.elapsed);
        if samples.len() > SAMPLES {
            samples.pop_front();
        }
        figures.recent.push_back(failed);
        if figures.recent.len() > WINDOW {
            figures.recent.pop_front();
        }
        if let Some(error) = ended.error.filter(|e| is_failure(e)) {
            figures.last_error = Some((SystemTime::now(), error.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runstate_core::memory::MemoryStore;
    use runstate_core::{StoreExt, WaitPolicy};

    #[tokio::test]
    async fn health_counts_calls_latencies_and_failures() {
        let health = Health::new();
        let store = Observed::new(Arc::new(MemoryStore::new()), health.clone());
        let run = RunId::new("r").unwrap();
        let doc = DocName::new("d").unwrap();
        store
            .put_bytes(&run, &doc, Bytes::from_static(b"x"))
            .await
            .unwrap();
        store.get_bytes(&run, &doc).await.unwrap();
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Ok);
        assert_eq!(report.calls, 2);
        assert_eq!(report.in_flight, 0);
        assert_eq!(report.latency.len(), 2);
        // A refused renewal counts against the leases, not the backend.
        let key = LockKey::Doc(run.clone(), doc.clone());
        let lease = store
            .try_acquire(&key, &Owner::for_this_process(), Duration::from_millis(5))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(store.renew(&lease, Duration::from_secs(1)).await.is_err());
        let report = health.report();
        assert_eq!(report.failed_renewals, 1);
        assert_eq!(report.status, HealthStatus::Degraded);
        let _ = WaitPolicy::no_wait();
    }

    /// Spans, metrics and health name each call by its own operation.
    #[tokio::test]
    async fn every_call_is_named_by_its_operation() {
        let health = Health::new();
        let store = Observed::new(Arc::new(MemoryStore::new()), health.clone());
        let run = RunId::new("r").unwrap();
        store.set_attr(&run, "has_sbs", "false").await.unwrap();
        store
            .mark(&run, "build_climate", SystemTime::now())
            .await
            .unwrap();
        let operations: Vec<&str> = health
            .report()
            .latency
            .iter()
            .map(|l| l.operation)
            .collect();
        assert_eq!(operations, ["mark", "set_attr"]);
    }

    #[tokio::test]
    async fn a_health_report_serializes_for_machines() {
        let health = Health::new();
        let store = Observed::new(Arc::new(MemoryStore::new()), health.clone());
        let run = RunId::new("r").unwrap();
        let doc = DocName::new("d").unwrap();
        store.get_bytes(&run, &doc).await.unwrap();
        let json = serde_json::to_value(health.report()).unwrap();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["calls"], 1);
        assert_eq!(json["in_flight"], 0);
        assert_eq!(json["failed_renewals"], 0);
        assert_eq!(json["last_error"], serde_json::Value::Null);
        assert_eq!(json["latency"][0]["operation"], "get");
        assert_eq!(json["latency"][0]["samples"], 1);
        assert!(json["latency"][0]["p99_us"].as_u64().is_some(), "{json}");

        let json = serde_json::to_value(HealthReport::unreachable("connection refused")).unwrap();
        assert_eq!(json["status"], "failing");
        assert_eq!(json["last_error"]["message"], "connection refused");
        assert!(
            json["last_error"]["at"].as_str().unwrap().ends_with('Z'),
            "{json}"
        );
        assert!(
            json["last_error"]["at_unix_ms"].as_u64().unwrap() > 0,
            "{json}"
        );
        assert_eq!(json["latency"], serde_json::json!([]));
    }
}
