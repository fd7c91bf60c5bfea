//! A wrapping object store for staging races and faults deterministically:
//! it forwards every call to an inner store, and on chosen calls holds the
//! request at a gate until the test opens it, or fails it as a full disk
//! or a refusing server would. It also counts delimited listings.

#![allow(dead_code)]

pub mod gcs;

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::stream::BoxStream;
use runstate_core::async_trait;
use runstate_s3::object_store::path::Path;
use runstate_s3::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use tokio::sync::watch;

/// A kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
}

/// Holds one call until opened. The test waits for the call to arrive,
/// does what must happen meanwhile, then opens the gate.
pub struct Gate {
    arrived: watch::Sender<bool>,
    open: watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            arrived: watch::Sender::new(false),
            open: watch::Sender::new(false),
        })
    }

    /// Waits until the held call has arrived at the gate.
    pub async fn arrived(&self) {
        let mut seen = self.arrived.subscribe();
        seen.wait_for(|arrived| *arrived).await.expect("gate alive");
    }

    /// Whether the held call has arrived.
    pub fn has_arrived(&self) -> bool {
        *self.arrived.borrow()
    }

    /// Lets the held call through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.arrived.send_replace(true);
        open.wait_for(|open| *open).await.expect("gate alive");
    }
}

type Fails = Box<dyn Fn(Op, &Path) -> bool + Send + Sync>;

/// A lost reply armed: the call, its path, its gate and what it answers.
type LostReply = (Op, String, Arc<Gate>, Answer);

/// What a call whose reply is lost answers instead (see
/// [`Faulty::lose_reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A transport failure or a 5xx that outlived the retries: the outcome
    /// is unknown to the caller.
    Failed,
    /// `412`: what object_store's retry of an applied conditional PUT gets.
    Precondition,
    /// `409`, as object_store reports it once its retries are spent:
    /// `AlreadyExists`, whatever the PUT's mode (S3 answers a conditional
    /// PUT racing another with `409 ConditionalRequestConflict`).
    Conflict,
}

impl Answer {
    fn error(self, location: &Path, what: &str) -> object_store::Error {
        match self {
            Answer::Failed => object_store::Error::Generic {
                store: "faulty",
                source: format!("injected: the reply to PUT {location} was lost").into(),
            },
            Answer::Precondition => object_store::Error::Precondition {
                path: location.to_string(),
                source: format!("injected: {what}").into(),
            },
            Answer::Conflict => object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: format!("injected: {what}").into(),
            },
        }
    }
}

/// The wrapping store.
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    /// One-shot holds: the first call of this kind on this path waits at
    /// the gate.
    holds: Mutex<Vec<(Op, String, Arc<Gate>)>>,
    fails: Fails,
    /// One-shot lost replies: the first call of this kind on this path is
    /// applied, then waits at the gate, then answers as told.
    lost: Mutex<Vec<LostReply>>,
    /// One-shot refusals: the first call of this kind on this path is not
    /// applied and answers as told.
    refused: Mutex<Vec<(Op, String, Answer)>>,
    /// One-shot held listings: the first listing of this prefix is made,
    /// then its reply waits at the gate.
    held_listings: Mutex<Vec<(String, Arc<Gate>)>>,
    /// Delimited listings, by prefix.
    listings: Mutex<Vec<String>>,
    calls: AtomicU64,
}

impl Faulty {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Faulty> {
        Self::failing(inner, |_, _| false)
    }

    /// A store whose calls fail when `fails` says so.
    pub fn failing(
        inner: Arc<dyn ObjectStore>,
        fails: impl Fn(Op, &Path) -> bool + Send + Sync + 'static,
    ) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            holds: Mutex::new(Vec::new()),
            fails: Box::new(fails),
            lost: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            held_listings: Mutex::new(Vec::new()),
            listings: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        })
    }

    /// Holds the next `op` on `path` at a new gate.
    pub fn hold(&self, op: Op, path: &str) -> Arc<Gate> {
        let gate = Gate::new();
        self.holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((op, path.to_owned(), Arc::clone(&gate)));
        gate
    }

    /// Applies the next `op` on `path`, then holds its reply at a new gate
    /// and, once the gate is opened, answers `answer` instead of the reply:
    /// a call the server applied whose reply was lost (and, with
    /// [`Answer::Precondition`], retried into a refusal).
    pub fn lose_reply(&self, op: Op, path: &str, answer: Answer) -> Arc<Gate> {
        let gate = Gate::new();
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((op, path.to_owned(), Arc::clone(&gate), answer));
        gate
    }

    /// Makes the next delimited listing of `prefix`, then holds its reply
    /// at a new gate: a listing that took its picture of the store early
    /// and arrives late.
    pub fn hold_listing_reply(&self, prefix: &str) -> Arc<Gate> {
        let gate = Gate::new();
        self.held_listings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((prefix.to_owned(), Arc::clone(&gate)));
        gate
    }

    /// Refuses the next `op` on `path` without applying it, answering
    /// `answer`.
    pub fn refuse(&self, op: Op, path: &str, answer: Answer) {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((op, path.to_owned(), answer));
    }

    /// The refusal armed for this call, taken (one-shot).
    fn take_refused(&self, op: Op, path: &Path) -> Option<Answer> {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        refused
            .iter()
            .position(|(o, p, _)| *o == op && p == path.as_ref())
            .map(|i| refused.remove(i).2)
    }

    /// The lost reply armed for this call, taken (one-shot).
    fn take_lost(&self, op: Op, path: &Path) -> Option<(Arc<Gate>, Answer)> {
        let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
        lost.iter()
            .position(|(o, p, _, _)| *o == op && p == path.as_ref())
            .map(|i| {
                let (_, _, gate, answer) = lost.remove(i);
                (gate, answer)
            })
    }

    /// The prefixes of the delimited listings so far.
    pub fn listings(&self) -> Vec<String> {
        self.listings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    async fn enter(&self, op: Op, path: &Path) -> object_store::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = {
            let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            holds
                .iter()
                .position(|(o, p, _)| *o == op && p == path.as_ref())
                .map(|i| holds.remove(i).2)
        };
        if let Some(gate) = gate {
            gate.pass().await;
        }
        if (self.fails)(op, path) {
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("injected failure of {op:?} {path}: no space left on device")
                    .into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.enter(Op::Put, location).await?;
        if let Some(answer) = self.take_refused(Op::Put, location) {
            return Err(answer.error(location, "the PUT was refused"));
        }
        let lost = self.take_lost(Op::Put, location);
        let reply = self.inner.put_opts(location, payload, opts).await;
        let Some((gate, answer)) = lost else {
            return reply;
        };
        gate.pass().await;
        Err(answer.error(location, "a retry of an applied PUT was refused"))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.enter(Op::Put, location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        self.enter(op, location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<runstate_core::Bytes>> {
        self.enter(Op::Get, location).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        self.enter(Op::List, &path).await?;
        self.listings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.to_string());
        let held = {
            let mut held = self
                .held_listings
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            held.iter()
                .position(|(p, _)| p == path.as_ref())
                .map(|i| held.remove(i).1)
        };
        let reply = self.inner.list_with_delimiter(prefix).await;
        if let Some(gate) = held {
            gate.pass().await;
        }
        reply
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.enter(Op::Put, to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.enter(Op::Put, to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

/// Paths (suffixes of object keys) whose writes fail, for the harnesses'
/// `make_unwritable`: shared by every store a harness opens in this
/// process, each case's keys being under its own random namespace.
static UNWRITABLE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Makes writes of keys ending in `suffix` fail.
pub fn make_unwritable(suffix: String) {
    UNWRITABLE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(suffix);
}

/// `inner` behind a [`Faulty`] that fails writes of the keys
/// [`make_unwritable`] registered.
pub fn with_unwritable(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    Faulty::failing(inner, |op, path| {
        op == Op::Put
            && UNWRITABLE
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|suffix| path.as_ref().ends_with(suffix.as_str()))
    })
}
