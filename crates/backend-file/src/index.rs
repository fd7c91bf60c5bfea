//! Remembered document versions, so a listing reads metadata, not contents.
//!
//! A version is the hash of a document's bytes. Hashing every document on
//! every listing would read a run's megabytes to list a few names, so each
//! run remembers the versions it computed in `.runstate/docs.index`, each
//! keyed by the file's [`Stamp`] (inode, size, modification and
//! status-change times in nanoseconds). A listing trusts an entry only
//! while the file's stamp is unchanged, and recomputes it otherwise. Any
//! write changes the status-change time (a save renames a new inode into
//! place; an in-place write by another program updates the times), so an
//! entry never outlives the content it describes, with one exception that
//! is guarded against: a file changed within a timestamp tick of being
//! hashed may keep its times through a second change ("racily clean", as
//! git calls it), so an entry is recorded only for a file whose times are
//! older than [`RACY_WINDOW_NS`](crate::folder::RACY_WINDOW_NS) when the
//! hashing began. A fresh save is therefore hashed once more by the first
//! listing after that window, then remembered.
//!
//! The index is a cache: it is rewritten whole through a temporary file and
//! a rename (never torn), without `fsync`; a missing, unreadable or foreign
//! index only costs a recomputation, and concurrent writers can only lose
//! each other's entries, never record a wrong one, since every entry is
//! checked against the file it names. A read never creates the
//! bookkeeping folder: in a run folder runstate has never written to, the
//! versions are remembered in this process's memory only.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::folder::{Access, Folder, FolderId, Stamp, read_bounded};
use crate::layout::{INDEX_FILE, temp_name};

/// Largest index read (an index of 100,000 documents is well under this).
const MAX_INDEX: u64 = 64 << 20;

/// Run folders whose index this process keeps in memory at most.
const MEMORY_RUNS: usize = 1024;

/// The remembered versions of one run folder's documents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RunIndex {
    #[serde(default)]
    v: u32,
    /// File name → the stamp it had and the version of its content then.
    #[serde(default)]
    docs: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    version: String,
}

impl RunIndex {
    /// The remembered version of `file` when its stamp is still `stamp`.
    pub(crate) fn version(&self, file: &str, stamp: &Stamp) -> Option<&str> {
        self.docs
            .get(file)
            .filter(|e| e.stamp == *stamp)
            .map(|e| e.version.as_str())
    }

    /// Remembers a version; returns whether anything changed.
    pub(crate) fn record(&mut self, file: &str, stamp: Stamp, version: &str) -> bool {
        let entry = Entry {
            stamp,
            version: version.to_owned(),
        };
        if self.docs.get(file) == Some(&entry) {
            return false;
        }
        self.docs.insert(file.to_owned(), entry);
        true
    }

    /// Whether it has entries for which `keep` is false.
    pub(crate) fn has_others(&self, mut keep: impl FnMut(&str) -> bool) -> bool {
        self.docs.keys().any(|name| !keep(name))
    }

    /// Forgets entries for which `keep` is false; returns whether any was.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) -> bool {
        let before = self.docs.len();
        self.docs.retain(|name, _| keep(name));
        self.docs.len() != before
    }

    /// Reads the index of a bookkeeping folder; empty when it is missing
    /// or unusable (it is only a cache).
    pub(crate) fn load(book: &Folder) -> RunIndex {
        let loaded = (|| {
            let file = book.open_file(INDEX_FILE, Access::Read)?;
            let Some(file) = file else {
                return Ok(RunIndex::default());
            };
            let bytes = read_bounded(&file, &book.child(INDEX_FILE), MAX_INDEX)?;
            serde_json::from_slice(&bytes).map_err(|e| {
                runstate_core::Error::new(runstate_core::ErrorKind::Corrupt, "unreadable index")
                    .with_source(e)
            })
        })();
        loaded.unwrap_or_else(|error| {
            tracing::warn!(
                path = %book.child(INDEX_FILE).display(),
                %error,
                "ignoring the document version index"
            );
            RunIndex::default()
        })
    }

    /// Writes the index into a bookkeeping folder, atomically (temporary
    /// file, then rename). Failures are logged: it is only a cache.
    pub(crate) fn save(&self, book: &Folder) {
        let name = temp_name(INDEX_FILE, false);
        let written = (|| {
            let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
            let mut file = book.create_temp(&name, 0o644)?;
            file.write_all(&text)?;
            book.rename(&name, INDEX_FILE)
        })();
        if let Err(error) = written {
            let _ = book.unlink(&name);
            tracing::warn!(
                path = %book.child(INDEX_FILE).display(),
                %error,
                "could not save the document version index"
            );
        }
    }
}

/// The indexes this process remembers, per run folder.
#[derive(Debug, Default)]
pub(crate) struct Indexes {
    runs: Mutex<HashMap<FolderId, Arc<RunIndex>>>,
}

impl Indexes {
    pub(crate) fn get(&self, run: &FolderId) -> Option<Arc<RunIndex>> {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(run)
            .cloned()
    }

    pub(crate) fn put(&self, run: FolderId, index: Arc<RunIndex>) {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if runs.len() >= MEMORY_RUNS && !runs.contains_key(&run) {
            // A crude bound: forgetting costs only recomputation.
            runs.clear();
        }
        runs.insert(run, index);
    }
}
