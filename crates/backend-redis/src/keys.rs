//! The key layout. Every key of a run shares the hash tag `{<run>}`, so a
//! run's documents, index, counters and locks sit in one slot.
//!
//! ```text
//! <p>:{<run>}:doc:<name>     hash  version, data     one document: its version (a random 128-bit token) and exact bytes
//! <p>:{<run>}:docs           zset  document names (score 0, listed by ZRANGEBYLEX)
//! <p>:{<run>}:staging        hash  bytes of a write in flight (only ever inside a MULTI/EXEC)
//! <p>:{<run>}:lock           hash  owner, oid, fence, ttl[, since]; PEXPIRE = TTL    the run lock
//! <p>:{<run>}:lock:<name>    hash  (same)                                      a document lock
//! <p>:{<run>}:fence[:<name>] string  fence counter of that lock (no TTL)
//! <p>:{<run>}:locks          set   lock keys of the run that were ever granted (live as long as their fences)
//! <p>:runs                   zset  runs with at least one document
//! <p>:lockruns               zset  runs whose locks were ever granted
//! ```
//!
//! Fence counters start from the server's clock in microseconds when first
//! created, so they keep increasing even across a restart of a server that
//! keeps nothing on disk.

use runstate_core::{DocName, LockKey, RunId};

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn run_base(&self, run: &RunId) -> String {
        format!("{}:{{{run}}}", self.prefix)
    }

    pub(crate) fn doc(&self, run: &RunId, doc: &DocName) -> String {
        format!("{}:doc:{doc}", self.run_base(run))
    }

    pub(crate) fn doc_prefix(&self, run: &RunId) -> String {
        format!("{}:doc:", self.run_base(run))
    }

    pub(crate) fn docs(&self, run: &RunId) -> String {
        format!("{}:docs", self.run_base(run))
    }

    /// Where a write stages its bytes inside its MULTI/EXEC.
    pub(crate) fn staging(&self, run: &RunId) -> String {
        format!("{}:staging", self.run_base(run))
    }

    pub(crate) fn lock(&self, key: &LockKey) -> String {
        match key {
            LockKey::Run(run) => format!("{}:lock", self.run_base(run)),
            LockKey::Doc(run, doc) => format!("{}:lock:{doc}", self.run_base(run)),
        }
    }

    pub(crate) fn fence(&self, key: &LockKey) -> String {
        match key {
            LockKey::Run(run) => format!("{}:fence", self.run_base(run)),
            LockKey::Doc(run, doc) => format!("{}:fence:{doc}", self.run_base(run)),
        }
    }

    pub(crate) fn locks(&self, run: &RunId) -> String {
        format!("{}:locks", self.run_base(run))
    }

    pub(crate) fn runs(&self) -> String {
        format!("{}:runs", self.prefix)
    }

    pub(crate) fn lock_runs(&self) -> String {
        format!("{}:lockruns", self.prefix)
    }

    /// Every key under the prefix, as a `SCAN MATCH` pattern (glob
    /// characters cannot occur in a validated prefix).
    pub(crate) fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }

    /// The lock a lock key names.
    pub(crate) fn parse_lock(&self, run: &RunId, key: &str) -> Option<LockKey> {
        let rest = key
            .strip_prefix(&self.run_base(run))?
            .strip_prefix(":lock")?;
        if rest.is_empty() {
            return Some(LockKey::Run(run.clone()));
        }
        let doc = DocName::new(rest.strip_prefix(':')?).ok()?;
        Some(LockKey::Doc(run.clone(), doc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_as_documented() {
        let keys = Keys::new("rs");
        let run = RunId::new("Mica_flume1").unwrap();
        let doc = DocName::new("climate").unwrap();
        assert_eq!(keys.doc(&run, &doc), "rs:{Mica_flume1}:doc:climate");
        assert_eq!(
            keys.lock(&LockKey::Run(run.clone())),
            "rs:{Mica_flume1}:lock"
        );
        let doc_lock = LockKey::Doc(run.clone(), doc);
        assert_eq!(keys.lock(&doc_lock), "rs:{Mica_flume1}:lock:climate");
        assert_eq!(keys.parse_lock(&run, &keys.lock(&doc_lock)), Some(doc_lock));
        assert_eq!(
            keys.parse_lock(&run, "rs:{Mica_flume1}:lock"),
            Some(LockKey::Run(run.clone()))
        );
        assert_eq!(keys.parse_lock(&run, "rs:{Mica_flume1}:locks"), None);
    }
}
