//! The cache contract: where a caching store keeps its copies.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::id::{DocName, RunId};
use crate::store::StoredDoc;
use crate::version::Version;

/// A cached copy of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cached {
    /// The bytes and the version they are.
    pub doc: StoredDoc,
    /// A moment at which this version was known to be the stored one (the
    /// moment the read or write that produced it was sent: a lower bound,
    /// so a copy is never served as fresher than it is).
    pub known_at: SystemTime,
}

impl Cached {
    /// A cached copy of `doc`, known current at `known_at`; for caches.
    pub fn new(doc: StoredDoc, known_at: SystemTime) -> Self {
        Cached { doc, known_at }
    }
}

/// Where a caching store keeps its copies: one version per document of a
/// run. In-process (an LRU in memory) or shared by workers (Redis).
///
/// A cache never decides what is current: every copy it hands out is
/// validated against the store (a conditional read), unless the caller
/// allows some staleness, and every locked save stays conditional on the
/// version read from the store under the lease. So a stale or lost entry
/// can cost a retry, never an update. Failures are the cache's own
/// business: its methods log and carry on, and a caching store then simply
/// asks the store.
#[async_trait]
pub trait Cache: Send + Sync + fmt::Debug + 'static {
    /// The cached copy of `doc` in `run`, if any.
    async fn get(&self, run: &RunId, doc: &DocName) -> Option<Cached>;

    /// The version of the cached copy and when it was known current,
    /// without its bytes: a cache that lives across a network answers it
    /// cheaply, so a caching store can ask the store whether that version
    /// is current *while* the bytes come from the cache. The default reads
    /// the whole copy.
    async fn version(&self, run: &RunId, doc: &DocName) -> Option<(Version, SystemTime)> {
        self.get(run, doc)
            .await
            .map(|c| (c.doc.version, c.known_at))
    }

    /// Records that the cached copy of `doc`, if it is still `version`, was
    /// known current at `known_at` (a validation found it unchanged), so
    /// readers allowing some staleness may serve it for longer. The
    /// default does nothing.
    async fn touch(&self, run: &RunId, doc: &DocName, version: &Version, known_at: SystemTime) {
        let _ = (run, doc, version, known_at);
    }

    /// Remembers `copy` as the copy of `doc` in `run`, replacing any other.
    async fn put(&self, run: &RunId, doc: &DocName, copy: Cached);

    /// Forgets the copy of `doc` in `run`.
    async fn remove(&self, run: &RunId, doc: &DocName);

    /// Forgets every copy of `run`'s documents.
    async fn remove_run(&self, run: &RunId);
}
