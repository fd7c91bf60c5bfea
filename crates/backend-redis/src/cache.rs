//! [`RedisCache`]: a document cache shared by every worker that reaches the
//! same Redis (see [`runstate_core::Cache`] for why a cache can never cause
//! a lost update).
//!
//! ```text
//! <prefix>:cache:{<run>}:<name>   hash  v (version), d (bytes), k (known-at, ms since the epoch); expires by its TTL
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{
    Bytes, Cache, Cached, DocName, Result, RunId, StoredDoc, Version, async_trait,
};

use crate::conn::{Conn, Reach};
use crate::errors::within;
use crate::{RedisConfig, RedisStore, SCAN_COUNT};

/// How long a cached copy lives by default (WEPPcloud keeps its NoDb cache
/// 72 hours).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(72 * 3600);

/// The longest a cached copy lives: a year. A longer TTL given to
/// [`RedisCache::open`] or [`RedisCache::beside`] (`Duration::MAX`
/// included) is brought down to it, because Redis refuses a `PEXPIRE` past
/// what its clock holds, and the copy would then be kept with no expiry
/// at all.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A document cache in Redis, keyed by run and document, holding one
/// version of each with its bytes. Cheap to clone.
#[derive(Clone)]
pub struct RedisCache {
    conn: Conn,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
}

impl RedisCache {
    /// A cache on the server, database and key prefix of `config`, whose
    /// entries live `ttl` (1 ms to [`MAX_CACHE_TTL`]; a TTL outside is
    /// brought to the nearer end).
    ///
    /// # Errors
    /// As [`RedisStore::open`].
    pub async fn open(config: RedisConfig, ttl: Duration) -> Result<RedisCache> {
        let store = RedisStore::open(config).await?;
        Ok(Self::beside(&store, ttl))
    }

    /// Parses `url` as [`RedisConfig::from_url`] does and opens a cache
    /// there with the default TTL.
    ///
    /// # Errors
    /// As [`RedisConfig::from_url`] and [`RedisStore::open`].
    pub async fn connect(url: &str) -> Result<RedisCache> {
        Self::open(RedisConfig::from_url(url)?, DEFAULT_CACHE_TTL).await
    }

    /// A cache sharing `store`'s connection, under its key prefix, whose
    /// entries live `ttl` (1 ms to [`MAX_CACHE_TTL`]; a TTL outside is
    /// brought to the nearer end).
    pub fn beside(store: &RedisStore, ttl: Duration) -> RedisCache {
        let config = store.config();
        RedisCache {
            conn: store.inner.conn.clone(),
            prefix: config.prefix().to_owned(),
            ttl: ttl.clamp(Duration::from_millis(1), MAX_CACHE_TTL),
            timeout: config.timeout(),
        }
    }

    fn key(&self, run: &RunId, doc: &DocName) -> String {
        format!("{}:cache:{{{run}}}:{doc}", self.prefix)
    }

    async fn bounded<T>(&self, request: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        within(self.timeout, request).await
    }

    /// Unlinks every entry of `run`. Its keys share the run's hash tag, so
    /// on a cluster they are all in one slot: the walk visits only the
    /// primary serving it (a `SCAN` sent anywhere else lists none of them).
    async fn forget_run(&self, run: &RunId) -> Result<()> {
        let pattern = format!("{}:cache:{{{run}}}:*", self.prefix);
        let keys = self
            .conn
            .walk(
                &pattern,
                Reach::SlotOf(&pattern),
                &self.prefix,
                self.timeout,
            )
            .await?;
        let mut con = self.conn.clone();
        for keys in keys.chunks(SCAN_COUNT) {
            self.bounded(redis::cmd("UNLINK").arg(keys).query_async::<u64>(&mut con))
                .await?;
        }
        Ok(())
    }

    fn log(&self, what: &str, error: &runstate_core::Error) {
        tracing::debug!(%error, "redis cache: {what} failed; the store is asked instead");
    }
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, run: &RunId, doc: &DocName) -> Option<Cached> {
        let mut con = self.conn.clone();
        let fetched: Result<(Option<String>, Option<Vec<u8>>, Option<u64>)> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(self.key(run, doc))
                    .arg("v")
                    .arg("d")
                    .arg("k")
                    .query_async(&mut con),
            )
            .await;
        match fetched {
            Ok((Some(version), Some(bytes), Some(known))) => Some(Cached::new(
                StoredDoc::new(Bytes::from(bytes), Version::new(version)),
                from_unix_millis(known),
            )),
            Ok(_) => None,
            Err(error) => {
                self.log("a read", &error);
                None
            }
        }
    }

    async fn version(
        &self,
        run: &RunId,
        doc: &DocName,
    ) -> Option<(Version, std::time::SystemTime)> {
        let mut con = self.conn.clone();
        let fetched: Result<(Option<String>, Option<u64>)> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(self.key(run, doc))
                    .arg("v")
                    .arg("k")
                    .query_async(&mut con),
            )
            .await;
        match fetched {
            Ok((Some(version), Some(known))) => {
                Some((Version::new(version), from_unix_millis(known)))
            }
            Ok(_) => None,
            Err(error) => {
                self.log("a version read", &error);
                None
            }
        }
    }

    async fn put(&self, run: &RunId, doc: &DocName, copy: Cached) {
        let key = self.key(run, doc);
        let mut pipe = redis::pipe();
        // Over what one Redis value holds: the copy is not kept, and an
        // older one is forgotten rather than left in its place.
        if crate::over_a_value(copy.doc.bytes.len()) {
            pipe.cmd("DEL").arg(&key).ignore();
            let mut con = self.conn.clone();
            if let Err(error) = self.bounded(pipe.query_async::<()>(&mut con)).await {
                self.log("a removal", &error);
            }
            return;
        }
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("v")
            .arg(copy.doc.version.as_str())
            .arg("d")
            .arg(copy.doc.bytes.as_ref())
            .arg("k")
            .arg(unix_millis(copy.known_at))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .ignore();
        let mut con = self.conn.clone();
        if let Err(error) = self.bounded(pipe.query_async::<()>(&mut con)).await {
            self.log("a write", &error);
        }
    }

    async fn touch(
        &self,
        run: &RunId,
        doc: &DocName,
        version: &Version,
        known_at: std::time::SystemTime,
    ) {
        // Only the copy validated (another worker may have replaced it),
        // and only forward: a touch that comes late must not make the copy
        // look older than a later validation found it.
        let script = redis::Script::new(
            "local f = redis.call('HMGET', KEYS[1], 'v', 'k') \
             if f[1] == ARGV[1] and (tonumber(f[2]) or 0) < tonumber(ARGV[2]) then \
               redis.call('HSET', KEYS[1], 'k', ARGV[2]) end return 0",
        );
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key(run, doc))
            .arg(version.as_str())
            .arg(unix_millis(known_at));
        let mut con = self.conn.clone();
        if let Err(error) = self.bounded(invocation.invoke_async::<i64>(&mut con)).await {
            self.log("a touch", &error);
        }
    }

    async fn remove(&self, run: &RunId, doc: &DocName) {
        let mut con = self.conn.clone();
        if let Err(error) = self
            .bounded(
                redis::cmd("UNLINK")
                    .arg(self.key(run, doc))
                    .query_async::<u64>(&mut con),
            )
            .await
        {
            self.log("a removal", &error);
        }
    }

    async fn remove_run(&self, run: &RunId) {
        // A walk that met a change of the cluster's layout is retryable:
        // one more try, since an entry left behind can be served to readers
        // allowing some staleness until they stop allowing it.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.forget_run(run).await {
                Ok(()) => return,
                Err(error) if tries < 2 && error.is_retryable() => {
                    self.log("forgetting a run (tried again)", &error);
                }
                Err(error) => {
                    // Entries left behind are served to reads allowing
                    // that much staleness until their TTL: worth a warning.
                    tracing::warn!(%error, run = %run, "redis cache: forgetting a run failed; its entries stay until their TTL");
                    return;
                }
            }
        }
    }
}
