//! The key layout. Every key of a run shares the hash tag `{<run>}`, so a
//! run's documents, index, counters and locks sit in one slot.
//!
//! ```text
//! <p>:{<run>}:doc:<name>     hash  version, data     one document: its version (a 128-bit token unique to the write) and exact bytes
//! <p>:{<run>}:docs           zset  document names (score 0, listed by ZRANGEBYLEX)
//! <p>:{<run>}:staging        hash  bytes of a write in flight (only ever inside a MULTI/EXEC)
//! <p>:{<run>}:lock           hash  owner, oid, fence, since, ttl; PEXPIRE = TTL    the run lock
//! <p>:{<run>}:lock:<name>    hash  (same)                                      a document lock
//! <p>:{<run>}:fence[:<name>] string  last fence of that lock (no TTL)
//! <p>:{<run>}:locks          set   lock keys of the run that were ever granted (live as long as their fences)
//! <p>:{<run>}:watermark[:<name>]  string  highest fence of that lock granted by ANOTHER lock service and seen here (no TTL)
//! <p>:{<run>}:milestones     hash  timestamps:<task> (epoch seconds), attrs:<name> (text)
//! <p>:{<run>}:status         stream  status messages: fields topic, text, at (publisher's clock, ms); capped
//! <p>:runs                   zset  runs with at least one document (one server only: a cluster keeps no store-wide key)
//! ```
//!
//! And two pub/sub channels per run (channels are not keys: every database
//! of a server shares them, so a store on database `N` other than 0 appends
//! `:db<N>` to both names, see `listener::StoreKeys`):
//!
//! ```text
//! <p>:{<run>}:events         what the write scripts announce: `c <version> <doc>` (written),
//!                            `d <doc>` (deleted), `r <fence>` / `r <fence> <doc>` (run / document lock released)
//! <p>:{<run>}:status:live    each status message as published: `<id> <at ms> <topic> <text>`
//! ```
//!
//! Every grant's fence is `max(last fence + 1, server clock in µs)`, so
//! fences keep increasing across a restart that lost the last grants (a
//! server that keeps nothing on disk, an older snapshot, a truncated AOF,
//! a promoted replica): the clock kept running while the counter went
//! back.
//!
//! There is no store-wide index of locks: `list_locks(None)` finds the
//! lock hashes with `SCAN MATCH <p>:{*}:lock*`, so acquiring touches only
//! the run's slot. (Earlier versions kept a `<p>:lockruns` zset; it is
//! no longer read or written and may be deleted.)

use runstate_core::{DocName, LockKey, RunId};

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// `<prefix>:runs`, made once: every write on one server names it.
    runs: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            runs: format!("{prefix}:runs"),
        }
    }

    /// `<prefix>:{<run>}<tail>[:<name>]`, built in one allocation: every
    /// call builds several keys, and `format!` of a `format!` cost more
    /// than the rest of the request's preparation.
    fn run_key(&self, run: &RunId, tail: &str, name: Option<&str>) -> String {
        let run = run.as_str();
        let name_len = name.map_or(0, |n| n.len() + 1);
        let mut key =
            String::with_capacity(self.prefix.len() + run.len() + tail.len() + name_len + 3);
        key.push_str(&self.prefix);
        key.push_str(":{");
        key.push_str(run);
        key.push('}');
        key.push_str(tail);
        if let Some(name) = name {
            key.push(':');
            key.push_str(name);
        }
        key
    }

    fn run_base(&self, run: &RunId) -> String {
        self.run_key(run, "", None)
    }

    /// The store's key prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn doc(&self, run: &RunId, doc: &DocName) -> String {
        self.run_key(run, ":doc", Some(doc.as_str()))
    }

    pub(crate) fn doc_prefix(&self, run: &RunId) -> String {
        self.run_key(run, ":doc:", None)
    }

    pub(crate) fn docs(&self, run: &RunId) -> String {
        self.run_key(run, ":docs", None)
    }

    /// Where a write stages its bytes inside its MULTI/EXEC.
    pub(crate) fn staging(&self, run: &RunId) -> String {
        self.run_key(run, ":staging", None)
    }

    pub(crate) fn lock(&self, key: &LockKey) -> String {
        self.run_key(key.run(), ":lock", key.doc().map(DocName::as_str))
    }

    pub(crate) fn fence(&self, key: &LockKey) -> String {
        self.run_key(key.run(), ":fence", key.doc().map(DocName::as_str))
    }

    /// The fence watermark of a lock (for leases granted elsewhere).
    pub(crate) fn watermark(&self, key: &LockKey) -> String {
        self.run_key(key.run(), ":watermark", key.doc().map(DocName::as_str))
    }

    pub(crate) fn milestones(&self, run: &RunId) -> String {
        self.run_key(run, ":milestones", None)
    }

    /// The stream of a run's status messages.
    pub(crate) fn status(&self, run: &RunId) -> String {
        self.run_key(run, ":status", None)
    }

    /// The channel the write scripts announce a run's changes on.
    pub(crate) fn events(&self, run: &RunId) -> String {
        self.run_key(run, ":events", None)
    }

    /// The channel a run's status messages are announced on.
    pub(crate) fn status_channel(&self, run: &RunId) -> String {
        self.run_key(run, ":status:live", None)
    }

    pub(crate) fn locks(&self, run: &RunId) -> String {
        self.run_key(run, ":locks", None)
    }

    pub(crate) fn runs(&self) -> &str {
        &self.runs
    }

    /// Every lock key under the prefix, as a `SCAN MATCH` pattern. It also
    /// matches each run's `locks` index, which [`Keys::parse_any_lock`]
    /// sorts out. Ids and the prefix hold no glob characters.
    pub(crate) fn lock_pattern(&self) -> String {
        format!("{}:{{*}}:lock*", self.prefix)
    }

    /// Every run's document index, as a `SCAN MATCH` pattern (how a
    /// cluster, which keeps no store-wide run index, lists runs).
    pub(crate) fn docs_pattern(&self) -> String {
        format!("{}:{{*}}:docs", self.prefix)
    }

    /// The run whose document index `key` is, if it is one.
    pub(crate) fn parse_docs(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (run, tail) = rest.split_once('}')?;
        (tail == ":docs" && RunId::new(run).is_ok()).then(|| run.to_owned())
    }

    /// This store's keys, as `SCAN MATCH` patterns of its runs' keys and of
    /// a [`RedisCache`](crate::RedisCache) under the same prefix, and the
    /// names of its store-wide keys (glob characters cannot occur in a
    /// validated prefix). Not `<prefix>:*`, which also matches the keys of
    /// a store whose prefix extends this one (`p:q` of `p`).
    pub(crate) fn own(&self) -> ([String; 2], [String; 2]) {
        (
            [
                format!("{}:{{*", self.prefix),
                format!("{}:cache:{{*", self.prefix),
            ],
            [self.runs.clone(), format!("{}:lockruns", self.prefix)],
        )
    }

    /// The lock any lock key under the prefix names, its run included;
    /// `None` for any other key.
    pub(crate) fn parse_any_lock(&self, key: &str) -> Option<LockKey> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        // Run ids cannot hold `}`, so the first one closes the hash tag.
        let (run, _) = rest.split_once('}')?;
        let run = RunId::new(run).ok()?;
        self.parse_lock(&run, key)
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
        assert_eq!(
            keys.parse_lock(&run, &keys.lock(&doc_lock)),
            Some(doc_lock.clone())
        );
        assert_eq!(
            keys.parse_lock(&run, "rs:{Mica_flume1}:lock"),
            Some(LockKey::Run(run.clone()))
        );
        assert_eq!(keys.parse_lock(&run, "rs:{Mica_flume1}:locks"), None);
        assert_eq!(
            keys.watermark(&doc_lock),
            "rs:{Mica_flume1}:watermark:climate"
        );
        assert_eq!(
            keys.watermark(&LockKey::Run(run.clone())),
            "rs:{Mica_flume1}:watermark"
        );
        assert_eq!(keys.doc_prefix(&run), "rs:{Mica_flume1}:doc:");
        assert_eq!(keys.docs(&run), "rs:{Mica_flume1}:docs");
        assert_eq!(keys.staging(&run), "rs:{Mica_flume1}:staging");
        assert_eq!(keys.fence(&doc_lock), "rs:{Mica_flume1}:fence:climate");
        assert_eq!(
            keys.fence(&LockKey::Run(run.clone())),
            "rs:{Mica_flume1}:fence"
        );
        assert_eq!(keys.locks(&run), "rs:{Mica_flume1}:locks");
        assert_eq!(keys.runs(), "rs:runs");
        assert_eq!(keys.milestones(&run), "rs:{Mica_flume1}:milestones");
        assert_eq!(keys.status(&run), "rs:{Mica_flume1}:status");
        assert_eq!(keys.events(&run), "rs:{Mica_flume1}:events");
        assert_eq!(keys.status_channel(&run), "rs:{Mica_flume1}:status:live");
        // None of them reads as a lock.
        for key in [
            keys.watermark(&doc_lock),
            keys.milestones(&run),
            keys.status(&run),
        ] {
            assert_eq!(keys.parse_any_lock(&key), None, "{key}");
        }
        assert_eq!(keys.lock_pattern(), "rs:{*}:lock*");
        assert_eq!(keys.docs_pattern(), "rs:{*}:docs");
        assert_eq!(
            keys.parse_docs("rs:{Mica_flume1}:docs").as_deref(),
            Some("Mica_flume1")
        );
        for other in [
            "rs:{Mica_flume1}:docs:x",
            "rs:{Mica_flume1}:doc:docs",
            "rsx:{Mica_flume1}:docs",
            "rs:{bad/run}:docs",
        ] {
            assert_eq!(keys.parse_docs(other), None, "{other}");
        }
        assert_eq!(
            keys.parse_any_lock("rs:{Mica_flume1}:lock:climate"),
            Some(doc_lock)
        );
        assert_eq!(
            keys.parse_any_lock("rs:{Mica_flume1}:lock"),
            Some(LockKey::Run(run.clone()))
        );
        for other in [
            "rs:{Mica_flume1}:locks",
            "rs:{Mica_flume1}:doc:lock",
            "rsx:{Mica_flume1}:lock",
            "rs:x:{Mica_flume1}:lock",
            "rs:{bad/run}:lock",
            "rs:{Mica_flume1",
        ] {
            assert_eq!(keys.parse_any_lock(other), None, "{other}");
        }
    }
}
