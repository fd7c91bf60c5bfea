//! The one error type of runstate: a kind, where it happened, and the cause.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::id::{DocName, RunId};
use crate::lease::{Fence, Lease, LockInfo, LockKey};

/// A boxed error kept as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with runstate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, independent of the backend.
///
/// Match on this to decide what to do; new kinds may be added, so keep a
/// wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A run id, document name, or other key is not acceptable.
    InvalidKey,
    /// An argument is inconsistent (for example a lease that does not cover
    /// the document it is used for).
    InvalidArgument,
    /// The document does not exist.
    NotFound,
    /// A `Create` found the document already there.
    AlreadyExists,
    /// An `Update(version)` or conditional delete found another version (or
    /// no document).
    Precondition,
    /// The lock is held by someone else; [`Error::holder`] says who.
    Locked,
    /// A renew or release of a lease that expired or was taken over.
    LeaseLost,
    /// A save under a lease that is no longer the current grant of its lock.
    /// Nothing was written.
    Fenced,
    /// A document over the size limit; nothing was written or read.
    TooLarge,
    /// Stored bytes that do not decode with the expected codec.
    Corrupt,
    /// The backend cannot do this.
    Unsupported,
    /// A bad URL, option or setting.
    Config,
    /// The backend refused for safety (for example a run folder that is a
    /// symlink out of the store's root).
    Denied,
    /// A call took longer than its configured bound.
    Timeout,
    /// Any other failure of the backend (I/O, network, server).
    Backend,
}

impl ErrorKind {
    /// A short lowercase description, as used in `Display`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidKey => "invalid key",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Precondition => "precondition failed",
            ErrorKind::Locked => "locked",
            ErrorKind::LeaseLost => "lease lost",
            ErrorKind::Fenced => "fenced",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Config => "configuration error",
            ErrorKind::Denied => "denied",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Backend => "backend error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation during which an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant is named after the method it stands for
pub enum Operation {
    Open,
    Get,
    Put,
    Delete,
    ListDocs,
    ListRuns,
    DeleteRun,
    Acquire,
    Renew,
    Release,
    Inspect,
    BreakLock,
    ListLocks,
    AcquireAndLoad,
    SaveAndRelease,
    Load,
    Save,
    Update,
    Commit,
    /// Copying runs from one store to another.
    Migrate,
    /// Comparing runs of two stores.
    Verify,
    /// Probing what a backend honours.
    Doctor,
    /// Raising a fence watermark ([`Store::claim`](crate::Store::claim)).
    Claim,
    /// A conditional read ([`Store::get_if_changed`](crate::Store::get_if_changed)).
    GetIfChanged,
    /// Watching a run.
    Watch,
    /// Publishing a status message.
    Publish,
    /// Subscribing to status messages.
    Subscribe,
    /// Marking a milestone.
    Mark,
    /// Setting an attribute.
    SetAttr,
    /// Reading milestones and attributes.
    Milestones,
    /// Reading several documents at once.
    GetMany,
    /// Reading a document's metadata.
    Head,
    /// Writing several documents at once.
    PutMany,
}

impl Operation {
    /// The snake-case name of the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Get => "get",
            Operation::Put => "put",
            Operation::Delete => "delete",
            Operation::ListDocs => "list_docs",
            Operation::ListRuns => "list_runs",
            Operation::DeleteRun => "delete_run",
            Operation::Acquire => "acquire",
            Operation::Renew => "renew",
            Operation::Release => "release",
            Operation::Inspect => "inspect",
            Operation::BreakLock => "break_lock",
            Operation::ListLocks => "list_locks",
            Operation::AcquireAndLoad => "acquire_and_load",
            Operation::SaveAndRelease => "save_and_release",
            Operation::Load => "load",
            Operation::Save => "save",
            Operation::Update => "update",
            Operation::Commit => "commit",
            Operation::Migrate => "migrate",
            Operation::Verify => "verify",
            Operation::Doctor => "doctor",
            Operation::Claim => "claim",
            Operation::GetIfChanged => "get_if_changed",
            Operation::Watch => "watch",
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Mark => "mark",
            Operation::SetAttr => "set_attr",
            Operation::Milestones => "milestones",
            Operation::GetMany => "get_many",
            Operation::Head => "head",
            Operation::PutMany => "put_many",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runstate error: a [`kind`](Error::kind), a message, context (backend,
/// operation, run, document, lock), whether retrying may help, the current
/// lock holder when that matters, and the underlying error kept as
/// [`source`](std::error::Error::source).
///
/// `Display` prints the kind, the message and the context on one line; the
/// source is not repeated there, walk the `source()` chain to print causes.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    backend: Option<&'static str>,
    operation: Option<Operation>,
    run: Option<RunId>,
    doc: Option<DocName>,
    lock: Option<LockKey>,
    retryable: bool,
    holder: Option<LockInfo>,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a message saying what happened.
    ///
    /// [`ErrorKind::Timeout`] and [`ErrorKind::Locked`] errors start out
    /// retryable; everything else starts out permanent.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                backend: None,
                operation: None,
                run: None,
                doc: None,
                lock: None,
                retryable: matches!(kind, ErrorKind::Timeout | ErrorKind::Locked),
                holder: None,
                source: None,
            }),
        }
    }

    /// Records which backend raised the error (`"file"`, `"redis"`, …).
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.inner.backend = Some(backend);
        self
    }

    /// Records the operation, unless one is already recorded (the innermost
    /// operation is the most precise).
    pub fn with_operation(mut self, operation: Operation) -> Self {
        self.inner.operation.get_or_insert(operation);
        self
    }

    /// Records the run.
    pub fn with_run(mut self, run: &RunId) -> Self {
        self.inner.run = Some(run.clone());
        self
    }

    /// Records the document.
    pub fn with_doc(mut self, doc: &DocName) -> Self {
        self.inner.doc = Some(doc.clone());
        self
    }

    /// Records where a run-wide call failed (a status message, a milestone,
    /// a listing, a deletion of the run): the operation (unless one is
    /// already recorded) and the run. Every backend wraps the errors of its
    /// per-run calls with it.
    pub fn at_run(self, operation: Operation, run: &RunId) -> Self {
        self.with_operation(operation).with_run(run)
    }

    /// Records where a document call failed: the operation (unless one is
    /// already recorded), the run and the document. Every backend wraps
    /// the errors of its per-document calls with it.
    pub fn at_doc(self, operation: Operation, run: &RunId, doc: &DocName) -> Self {
        self.at_run(operation, run).with_doc(doc)
    }

    /// Records the lock (and its run and document).
    pub fn with_lock(mut self, lock: &LockKey) -> Self {
        self.inner.run.get_or_insert_with(|| lock.run().clone());
        if let Some(doc) = lock.doc() {
            self.inner.doc.get_or_insert_with(|| doc.clone());
        }
        self.inner.lock = Some(lock.clone());
        self
    }

    /// Records the current holder of the lock involved.
    pub fn with_holder(mut self, holder: LockInfo) -> Self {
        self.inner.holder = Some(holder);
        self
    }

    /// Keeps `source` as the cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Marks whether retrying the same call may succeed.
    pub fn set_retryable(mut self, retryable: bool) -> Self {
        self.inner.retryable = retryable;
        self
    }

    /// A [`LeaseLost`](ErrorKind::LeaseLost) refusal to renew or release
    /// `lease`: it is no longer its owner's. `holder` is the lock's current
    /// holder when the store read one, and the message says why from it: a
    /// holder with another fence took the lock over, one with the same
    /// fence is another owner, and without a holder the lease expired, was
    /// released or was broken. The lock (with its run and document) and
    /// the holder are recorded; the caller adds its backend and operation.
    ///
    /// Every backend builds its lost leases with this constructor or
    /// [`lease_lost_because`](Self::lease_lost_because), so that every
    /// store records the lock and the holder the same way (the words of a
    /// store-specific reason are the store's).
    #[must_use]
    pub fn lease_lost(lease: &Lease, holder: Option<LockInfo>) -> Self {
        let why = match &holder {
            Some(holder) if holder.fence != lease.fence() => {
                "the lock was taken over by a newer grant"
            }
            Some(_) => "the lock is held by another owner",
            None => "the lease expired, was released or was broken",
        };
        Self::lease_lost_because(lease.key(), why, holder)
    }

    /// A [`LeaseLost`](ErrorKind::LeaseLost) refusal on `lock` for a
    /// reason only the store can name (`why`: "the lock's record no longer
    /// exists", "WEPPcloud holds the lock now", …), with the current
    /// `holder` when known. See [`lease_lost`](Self::lease_lost).
    #[must_use]
    pub fn lease_lost_because(
        lock: &LockKey,
        why: impl Into<Cow<'static, str>>,
        holder: Option<LockInfo>,
    ) -> Self {
        Error::new(ErrorKind::LeaseLost, why)
            .with_lock(lock)
            .with_optional_holder(holder)
    }

    /// A [`Fenced`](ErrorKind::Fenced) refusal of a write under `lease`,
    /// which is no longer the current grant of its lock; nothing was
    /// written. `holder` is the lock's current holder when the store read
    /// one. The lock (with its run and document) and the holder are
    /// recorded; the caller adds its backend and operation.
    #[must_use]
    pub fn fenced(lease: &Lease, holder: Option<LockInfo>) -> Self {
        Error::new(
            ErrorKind::Fenced,
            format!(
                "lease with fence {} is no longer the current grant of its lock; nothing was written",
                lease.fence()
            ),
        )
        .with_lock(lease.key())
        .with_optional_holder(holder)
    }

    /// A [`Fenced`](ErrorKind::Fenced) refusal of a write under `lease`
    /// for a reason the store names (`why`: "its deadline has passed", …).
    /// See [`fenced`](Self::fenced).
    #[must_use]
    pub fn fenced_because(lease: &Lease, why: &str, holder: Option<LockInfo>) -> Self {
        Error::new(
            ErrorKind::Fenced,
            format!(
                "lease with fence {}: {why}; nothing was written",
                lease.fence()
            ),
        )
        .with_lock(lease.key())
        .with_optional_holder(holder)
    }

    /// A [`Fenced`](ErrorKind::Fenced) refusal of `fence`, a grant of
    /// `lock` by another lock service, because a newer grant's fence
    /// (`claimed`, when the store can say which) was already claimed here
    /// for it; nothing was written. The caller adds its backend and
    /// operation.
    #[must_use]
    pub fn below_watermark(lock: &LockKey, fence: Fence, claimed: Option<Fence>) -> Self {
        let message = match claimed {
            Some(claimed) => format!(
                "fence {fence} is older than fence {claimed} already claimed here for this lock; \
                 nothing was written"
            ),
            None => format!(
                "fence {fence} is older than a fence already claimed here for this lock; \
                 nothing was written"
            ),
        };
        Error::new(ErrorKind::Fenced, message).with_lock(lock)
    }

    /// Records the holder when there is one.
    fn with_optional_holder(self, holder: Option<LockInfo>) -> Self {
        match holder {
            Some(holder) => self.with_holder(holder),
            None => self,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The backend that raised the error, if known.
    pub fn backend(&self) -> Option<&'static str> {
        self.inner.backend
    }

    /// The operation during which it happened, if known.
    pub fn operation(&self) -> Option<Operation> {
        self.inner.operation
    }

    /// The run involved, if any.
    pub fn run(&self) -> Option<&RunId> {
        self.inner.run.as_ref()
    }

    /// The document involved, if any.
    pub fn doc(&self) -> Option<&DocName> {
        self.inner.doc.as_ref()
    }

    /// The lock involved, if any.
    pub fn lock(&self) -> Option<&LockKey> {
        self.inner.lock.as_ref()
    }

    /// Who holds the lock, for [`ErrorKind::Locked`] and, when known,
    /// [`ErrorKind::Fenced`] and [`ErrorKind::LeaseLost`].
    pub fn holder(&self) -> Option<&LockInfo> {
        self.inner.holder.as_ref()
    }

    /// How long until the holder's lease expires, for `Locked` errors.
    pub fn expires_in(&self) -> Option<Duration> {
        self.inner.holder.as_ref().map(|h| h.expires_in)
    }

    /// For an error of [`Lock::renew`](crate::Lock::renew): whether the
    /// store refused the lease itself (lost, fenced, or not a lease it can
    /// renew), as opposed to failing to answer. A lease refused so is lost
    /// for good; a renewal that failed otherwise may be tried again until
    /// the lease's deadline. (`InvalidArgument` from any other call is
    /// counted too: ask it of renewals only.)
    pub fn is_lease_refusal(&self) -> bool {
        self.is_lease_lost() || self.inner.kind == ErrorKind::InvalidArgument
    }

    /// Whether a call under a lease found it no longer the lock's grant
    /// ([`ErrorKind::Fenced`] or [`ErrorKind::LeaseLost`]): the lease is
    /// not the caller's to release any more (a `save_and_release` that
    /// failed so releases nothing).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self.inner.kind, ErrorKind::LeaseLost | ErrorKind::Fenced)
    }

    /// Whether the same call may succeed if retried (a dropped connection, a
    /// timeout, a busy lock). Errors that prove the request was refused
    /// (`Precondition`, `Fenced`, `InvalidKey`, …) are never retryable.
    pub fn is_retryable(&self) -> bool {
        self.inner.retryable
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        write!(f, "{}: {}", inner.kind, inner.message)?;
        if let Some(holder) = &inner.holder {
            write!(f, "; held by {holder}")?;
        }
        let mut context: Vec<String> = Vec::new();
        if let Some(backend) = inner.backend {
            context.push(format!("backend={backend}"));
        }
        if let Some(operation) = inner.operation {
            context.push(format!("op={operation}"));
        }
        if let Some(run) = &inner.run {
            context.push(format!("run={run}"));
        }
        if let Some(doc) = &inner.doc {
            context.push(format!("doc={doc}"));
        }
        if let Some(lock) = &inner.lock {
            context.push(format!("lock={lock}"));
        }
        if inner.retryable {
            context.push("retryable".to_owned());
        }
        if !context.is_empty() {
            write!(f, " [{}]", context.join(" "))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &inner.kind)
            .field("message", &inner.message);
        if let Some(backend) = inner.backend {
            d.field("backend", &backend);
        }
        if let Some(operation) = inner.operation {
            d.field("operation", &operation);
        }
        if let Some(run) = &inner.run {
            d.field("run", run);
        }
        if let Some(doc) = &inner.doc {
            d.field("doc", doc);
        }
        if let Some(lock) = &inner.lock {
            d.field("lock", lock);
        }
        if let Some(holder) = &inner.holder {
            d.field("holder", holder);
        }
        d.field("retryable", &inner.retryable);
        if let Some(source) = &inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Formats an error and its whole `source()` chain on one line, as
/// `error: cause: cause`, for logs and command-line output.
pub fn display_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Some wrappers repeat their cause in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_kind_message_and_context() {
        let run = RunId::new("r1").unwrap();
        let doc = DocName::new("ron").unwrap();
        let err = Error::new(ErrorKind::Precondition, "stored version differs")
            .with_backend("file")
            .with_operation(Operation::Put)
            .with_run(&run)
            .with_doc(&doc);
        assert_eq!(
            err.to_string(),
            "precondition failed: stored version differs [backend=file op=put run=r1 doc=ron]"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn source_is_kept_not_flattened() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let err = Error::new(ErrorKind::Backend, "write failed").with_source(io);
        let source = std::error::Error::source(&err).unwrap();
        let io = source.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        assert!(!err.to_string().contains("disk full"));
        assert_eq!(
            display_chain(&err),
            "backend error: write failed: disk full"
        );
    }

    #[test]
    fn first_operation_wins() {
        let err = Error::new(ErrorKind::Backend, "x")
            .with_operation(Operation::Get)
            .with_operation(Operation::Load);
        assert_eq!(err.operation(), Some(Operation::Get));
    }

    /// A lease on `ron` of `r1` with fence 7, and a holder of that lock
    /// with `fence`.
    fn lease_and_holder(fence: u64) -> (Lease, LockInfo) {
        use crate::lease::Owner;
        use std::time::{Instant, SystemTime};
        let key = LockKey::Doc(RunId::new("r1").unwrap(), DocName::new("ron").unwrap());
        let lease = Lease::new(
            key.clone(),
            Owner::for_this_process(),
            Fence(7),
            Duration::from_secs(5),
            Instant::now(),
            SystemTime::now(),
        );
        let holder = LockInfo::new(
            key,
            Owner::new("other-host", 42, "w1").unwrap(),
            Fence(fence),
            SystemTime::now(),
            Duration::from_secs(3),
        );
        (lease, holder)
    }

    #[test]
    fn a_lost_lease_says_why_from_its_holder() {
        let (lease, newer) = lease_and_holder(8);
        let (_, same_fence) = lease_and_holder(7);
        for (holder, why) in [
            (Some(newer), "the lock was taken over by a newer grant"),
            (Some(same_fence), "the lock is held by another owner"),
            (None, "the lease expired, was released or was broken"),
        ] {
            let had_holder = holder.as_ref().map(|h| h.fence);
            let err = Error::lease_lost(&lease, holder)
                .with_backend("file")
                .with_operation(Operation::Renew);
            assert_eq!(err.kind(), ErrorKind::LeaseLost);
            assert_eq!(err.message(), why);
            assert_eq!(err.lock(), Some(lease.key()));
            assert_eq!(err.run().map(RunId::as_str), Some("r1"));
            assert_eq!(err.doc().map(DocName::as_str), Some("ron"));
            assert_eq!(err.holder().map(|h| h.fence), had_holder);
            assert_eq!(err.operation(), Some(Operation::Renew));
            assert!(!err.is_retryable());
        }
        let err = Error::lease_lost_because(lease.key(), "the record is gone", None);
        assert_eq!(err.message(), "the record is gone");
        assert!(err.holder().is_none());
    }

    #[test]
    fn a_fenced_write_names_its_fence_and_the_newer_holder() {
        let (lease, newer) = lease_and_holder(8);
        let err = Error::fenced(&lease, Some(newer));
        assert_eq!(err.kind(), ErrorKind::Fenced);
        assert_eq!(
            err.message(),
            "lease with fence 7 is no longer the current grant of its lock; nothing was written"
        );
        assert_eq!(err.holder().map(|h| h.fence), Some(Fence(8)));
        assert_eq!(err.lock(), Some(lease.key()));
        let err = Error::fenced_because(&lease, "its deadline has passed", None);
        assert_eq!(
            err.message(),
            "lease with fence 7: its deadline has passed; nothing was written"
        );
        assert!(err.holder().is_none());
        let err = Error::below_watermark(lease.key(), Fence(3), Some(Fence(9)));
        assert_eq!(err.kind(), ErrorKind::Fenced);
        assert_eq!(
            err.message(),
            "fence 3 is older than fence 9 already claimed here for this lock; nothing was written"
        );
        assert_eq!(err.lock(), Some(lease.key()));
        let err = Error::below_watermark(lease.key(), Fence(3), None);
        assert_eq!(
            err.message(),
            "fence 3 is older than a fence already claimed here for this lock; nothing was written"
        );
    }

    #[test]
    fn error_is_small() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }
}
