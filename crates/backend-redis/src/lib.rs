//! # runstate-redis
//!
//! The Redis backend of runstate: every operation is one server-side
//! script (one round trip, atomic), leases are judged by the server's
//! clock, and a locked update costs two round trips
//! ([`acquire_and_load`](Lock::acquire_and_load) and
//! [`save_and_release`](Lock::save_and_release)).
//!
//! ```no_run
//! use std::sync::Arc;
//! use runstate_core::{Client, RunId};
//! use runstate_redis::RedisStore;
//!
//! # async fn example() -> runstate_core::Result<()> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379/0?prefix=runstate").await?;
//! let run = Client::new(Arc::new(store)).run(RunId::new("Mica_flume1")?);
//! # Ok(()) }
//! ```
//!
//! ## Key layout
//!
//! Readable with `redis-cli`; see the [`keys`](crate#key-layout) table:
//!
//! ```text
//! <prefix>:{<run>}:doc:<name>     hash: version (random 128-bit token), data (exactly the saved bytes)
//! <prefix>:{<run>}:docs           zset of document names      (listing never uses KEYS)
//! <prefix>:{<run>}:lock[:<name>]  hash: owner, oid, fence, ttl (and since once renewed); expires by PEXPIRE
//! <prefix>:{<run>}:fence[:<name>] fence counter of that lock (no TTL)
//! <prefix>:{<run>}:locks          set of the run's lock keys ever granted
//! <prefix>:runs                   zset of runs with documents (listed by ZRANGEBYLEX pages)
//! <prefix>:lockruns               zset of runs whose locks were ever granted
//! <prefix>:{<run>}:staging        a write's bytes, only ever inside its MULTI/EXEC
//! ```
//!
//! ## Guarantees and their limits
//!
//! - Expiry uses the server's clock only (`PEXPIRE`, `PTTL`, `TIME` inside
//!   scripts). A fenced save checks, in the same script as the write, that
//!   the lock key still holds the lease's owner id and fence: an expired
//!   lease has no key, a newer grant has another fence.
//! - Fence counters live in the run's slot beside the data they protect,
//!   and start from the server's clock in microseconds: a non-persistent
//!   server that restarts loses data, leases and counters together, a
//!   client still holding a lease from before gets `LeaseLost`/`Fenced`,
//!   and new fences still exceed old ones. Versions are random 128-bit
//!   tokens, so a version from before a restart never matches a document
//!   written after it.
//! - A plain overwrite is a `MULTI/EXEC` of plain commands; every other
//!   write stages its bytes in the same transaction and a script checks
//!   and renames them into place, so no write copies the document through
//!   Lua.
//! - Scripts touch a run's keys and the store-wide `runs` index, so the
//!   backend needs a standalone server (or a single-shard deployment), not a
//!   multi-shard Redis Cluster.
//!
//! ## WEPPcloud's NoDb locks
//!
//! WEPPcloud locks a controller with `SET nodb-lock:<runid>:<relpath>
//! <payload> NX EX <ttl>`, where `relpath` is the file name (`climate.nodb`)
//! and the payload is JSON `{token, owner: "host:pid", acquired_at,
//! expires_at, ttl}`. With `?weppcloud_locks=<db>` (or
//! [`RedisConfig::with_weppcloud_locks`]), every script that writes a
//! document, and every acquire, first checks
//! `nodb-lock:<run>:<name>.<ext>` in that database; when it exists the
//! call fails with `Locked`, the holder shown as WEPPcloud's host and pid,
//! fence 0, and `expires_in` the key's remaining TTL. A run lock checks
//! every document of the run. runstate never takes or removes WEPPcloud's
//! keys.

#![forbid(unsafe_code)]

mod config;
mod errors;
mod keys;
mod reply;
mod scripts;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, ScriptInvocation, Value};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Error, ErrorKind, Fence, GetOptions, Lease, ListPage,
    Lock, LockInfo, LockKey, Operation, Owner, PutMode, PutOptions, ReleaseSignals, Result, RunId,
    Store, StoredDoc, Version, async_trait,
};

pub use config::{Address, DEFAULT_PREFIX, DEFAULT_TIMEOUT, RedisConfig, Secret, WeppcloudLocks};

use crate::errors::{map_redis_error, timed_out, unexpected};
use crate::keys::Keys;
use crate::reply::Reply;
use crate::scripts::Scripts;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "redis";

/// Documents deleted per script call by `delete_run`, so a huge run never
/// blocks the server for long.
const DELETE_BATCH: usize = 500;

/// Redis's largest bulk string.
const MAX_DOCUMENT: u64 = 512 * 1024 * 1024;

/// The Redis backend. Cheap to clone; clones share one multiplexed
/// connection that reconnects by itself.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    capabilities: Capabilities,
    signals: ReleaseSignals,
}

fn connection_info(config: &RedisConfig) -> Result<redis::ConnectionInfo> {
    let addr = match &config.address {
        Address::Tcp { host, port } => ConnectionAddr::Tcp(host.clone(), *port),
        #[cfg(feature = "tls")]
        Address::Tls { host, port } => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        #[cfg(not(feature = "tls"))]
        Address::Tls { .. } => {
            return Err(Error::new(
                ErrorKind::Config,
                "rediss:// needs TLS support: enable the cargo feature `tls` of runstate-redis",
            )
            .with_backend(BACKEND));
        }
        Address::Unix(path) => ConnectionAddr::Unix(path.clone()),
    };
    let mut settings = RedisConnectionInfo::default().set_db(config.db);
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    Ok(addr
        .into_connection_info()
        .map_err(map_redis_error)?
        .set_redis_settings(settings))
}

impl RedisStore {
    /// Connects (bounded by the connect timeout), checks the server
    /// answers, and loads the scripts.
    ///
    /// # Errors
    /// `Config` for bad settings or refused credentials; `Timeout` or a
    /// retryable `Backend` error when the server cannot be reached.
    pub async fn open(config: RedisConfig) -> Result<RedisStore> {
        let context = |e: Error| e.with_operation(Operation::Open);
        let client = redis::Client::open(connection_info(&config).map_err(context)?)
            .map_err(|e| context(map_redis_error(e)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let bound = config.connect_timeout * 3;
        let mut conn = match tokio::time::timeout(
            bound,
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(context(map_redis_error(e))),
            Err(_) => return Err(context(timed_out(bound))),
        };
        let scripts = Scripts::new(config.weppcloud.as_ref(), config.db);
        for script in scripts.all() {
            match tokio::time::timeout(config.timeout, script.load_async(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(context(map_redis_error(e))),
                Err(_) => return Err(context(timed_out(config.timeout))),
            }
        }
        tracing::debug!(server = %config.address, db = config.db, prefix = %config.prefix, "redis store open");
        Ok(RedisStore {
            inner: Arc::new(Inner {
                keys: Keys::new(&config.prefix),
                config,
                conn,
                scripts,
                capabilities: Capabilities::full(BACKEND)
                    .with_multi_host(true)
                    .with_max_document_size(Some(MAX_DOCUMENT)),
                signals: ReleaseSignals::new(),
            }),
        })
    }

    /// Parses `url` (see [`RedisConfig::from_url`]) and opens the store.
    ///
    /// # Errors
    /// As [`RedisConfig::from_url`] and [`RedisStore::open`].
    pub async fn connect(url: &str) -> Result<RedisStore> {
        Self::open(RedisConfig::from_url(url)?).await
    }

    /// The settings (passwords redacted when printed).
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The server-side id of the connection in use (`CLIENT ID`), for
    /// diagnostics such as `CLIENT KILL ID`.
    ///
    /// # Errors
    /// Connection errors and timeouts.
    pub async fn connection_id(&self) -> Result<i64> {
        let mut con = self.inner.conn.clone();
        self.inner
            .bounded(redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut con))
            .await
    }

    /// Deletes every key under this store's prefix, with `SCAN` and
    /// `UNLINK` (never `KEYS` or `FLUSHDB`), and returns how many. For
    /// tests and for decommissioning a namespace.
    ///
    /// # Errors
    /// Connection errors and timeouts.
    pub async fn purge_prefix(&self) -> Result<u64> {
        let mut con = self.inner.conn.clone();
        let pattern = self.inner.keys.pattern();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .inner
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut con),
                )
                .await?;
            if !batch.is_empty() {
                removed += self
                    .inner
                    .bounded(
                        redis::cmd("UNLINK")
                            .arg(&batch)
                            .query_async::<u64>(&mut con),
                    )
                    .await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

impl Inner {
    /// Runs a request under the configured bound.
    async fn bounded<T>(&self, request: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        match tokio::time::timeout(self.config.timeout, request).await {
            Ok(outcome) => outcome.map_err(map_redis_error),
            Err(_) => Err(timed_out(self.config.timeout)),
        }
    }

    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Reply> {
        let mut con = self.conn.clone();
        let value: Value = self.bounded(invocation.invoke_async(&mut con)).await?;
        Reply::parse(value)
    }

    /// Runs a pipeline (usually MULTI/EXEC) holding `script`, reloading the script and
    /// running the transaction again if the server had forgotten it (after
    /// a restart or `SCRIPT FLUSH`; the staged bytes of the failed attempt
    /// are simply staged again). Returns the replies of the commands that
    /// were not ignored.
    async fn transact(&self, pipe: &redis::Pipeline, script: &redis::Script) -> Result<Vec<Value>> {
        let mut con = self.conn.clone();
        let run = |mut con: ConnectionManager| async move {
            pipe.query_async::<Vec<Value>>(&mut con).await
        };
        // One bound for the whole call, reload and retry included.
        self.bounded(async {
            match run(con.clone()).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(&mut con).await?;
                    run(con).await
                }
                outcome => outcome,
            }
        })
        .await
    }

    fn ttl_ms(key: &LockKey, ttl: Duration, op: Operation) -> Result<u64> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "a lease TTL must be at least 1 ms",
            )
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(key));
        }
        Ok(ms)
    }

    fn locked(key: &LockKey, holder: LockInfo, op: Operation) -> Error {
        Error::new(ErrorKind::Locked, "the lock is held")
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(key)
            .with_holder(holder)
    }

    fn weppcloud_locked(key: &LockKey, reply: &mut Reply, op: Operation) -> Error {
        match reply.weppcloud_holder(key) {
            Ok((holder, doc)) => Error::new(
                ErrorKind::Locked,
                format!(
                    "document {doc} is locked by WEPPcloud (nodb-lock:{}:{doc}.*)",
                    key.run()
                ),
            )
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(key)
            .with_holder(holder),
            Err(e) => e,
        }
    }

    /// Acquire (and optionally load `doc`) in one script.
    async fn acquire(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        load: Option<(&DocName, GetOptions)>,
        op: Operation,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let ttl_ms = Self::ttl_ms(key, ttl, op)?;
        let owner_json = serde_json::to_string(owner).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
        })?;
        let run = key.run();
        let load_doc = load.map(|(doc, _)| doc);
        let doc_key = match load_doc.or(key.doc()) {
            Some(doc) => self.keys.doc(run, doc),
            None => self.keys.docs(run),
        };
        let limit = load
            .and_then(|(_, options)| options.limit)
            .map_or_else(String::new, |l| l.to_string());
        let mut invocation = self.scripts.acquire.prepare_invoke();
        invocation
            .key(self.keys.lock(key))
            .key(self.keys.fence(key))
            .key(self.keys.locks(run))
            .key(self.keys.lock_runs())
            .key(doc_key)
            .key(self.keys.docs(run));
        invocation
            .arg(owner_json)
            .arg(owner.id())
            .arg(ttl_ms)
            .arg(run.as_str())
            .arg(if load.is_some_and(|(_, o)| o.limit.is_some()) {
                "1"
            } else {
                "0"
            })
            .arg(limit)
            .arg(key.doc().map_or("", DocName::as_str));
        let issued = Instant::now();
        // Without a size limit the document comes from a plain HMGET
        // pipelined right behind the script, so its bytes skip Lua. It needs
        // no MULTI: a fenced writer cannot slip in between (we hold the
        // lock), and an unfenced one that does is caught by the holder's
        // version-checked save, exactly as if it had written a moment later.
        let (mut reply, mut loaded) = match load {
            Some((doc, options)) if options.limit.is_none() => {
                let mut pipe = redis::pipe();
                pipe.invoke_script(&invocation)
                    .cmd("HMGET")
                    .arg(self.keys.doc(run, doc))
                    .arg("version")
                    .arg("data");
                let mut replies = self
                    .transact(&pipe, &self.scripts.acquire)
                    .await?
                    .into_iter();
                let (Some(first), Some(second)) = (replies.next(), replies.next()) else {
                    return Err(unexpected("transaction replies"));
                };
                (Reply::parse(first)?, Some(second))
            }
            _ => (self.invoke(&invocation).await?, None),
        };
        match reply.status.as_str() {
            "ok" => {
                let fence: u64 = reply.text()?.parse().map_err(|_| unexpected("fence"))?;
                // The grant's time by the server's clock is derived when
                // someone asks; the lease itself carries the local one.
                let lease = Lease::new(
                    key.clone(),
                    owner.clone(),
                    Fence(fence),
                    ttl,
                    issued,
                    SystemTime::now(),
                );
                let stored = match loaded.take() {
                    Some(Value::Array(pair)) => {
                        let mut pair = pair.into_iter();
                        match (pair.next(), pair.next()) {
                            (Some(Value::BulkString(version)), Some(Value::BulkString(bytes))) => {
                                Some(StoredDoc {
                                    bytes: Bytes::from(bytes),
                                    version: Version::new(
                                        String::from_utf8(version)
                                            .map_err(|_| unexpected("version"))?,
                                    ),
                                })
                            }
                            _ => None,
                        }
                    }
                    Some(_) => return Err(unexpected("loaded document")),
                    None if load.is_some() => match (reply.text_opt()?, reply.bytes()?) {
                        (Some(version), Some(bytes)) => Some(StoredDoc {
                            bytes,
                            version: Version::new(version),
                        }),
                        _ => None,
                    },
                    None => None,
                };
                Ok((lease, stored))
            }
            "locked" => Err(Self::locked(key, reply.holder(key)?, op)),
            "foreign" => Err(Self::weppcloud_locked(key, &mut reply, op)),
            "toolarge" => Err(too_large(reply.int()?, load.and_then(|(_, o)| o.limit))),
            other => Err(unexpected(other)),
        }
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &Bytes,
        mode: &PutMode,
        lease: Option<&Lease>,
        release: bool,
    ) -> Result<Version> {
        if let Some(lease) = lease {
            lease.key().check_covers(run, doc)?;
        }
        let (mode_arg, expected) = match mode {
            PutMode::Overwrite => ("o", ""),
            PutMode::Create => ("c", ""),
            PutMode::Update(version) => ("u", version.as_str()),
        };
        let version = new_version();
        let doc_key = self.keys.doc(run, doc);
        if lease.is_none() && *mode == PutMode::Overwrite && self.config.weppcloud.is_none() {
            // Nothing to check: plain commands, no script.
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HSET")
                .arg(&doc_key)
                .arg("version")
                .arg(version.as_str())
                .arg("data")
                .arg(bytes.as_ref())
                .ignore()
                .cmd("ZADD")
                .arg(self.keys.docs(run))
                .arg(0)
                .arg(doc.as_str())
                .ignore()
                .cmd("ZADD")
                .arg(self.keys.runs())
                .arg(0)
                .arg(run.as_str())
                .ignore();
            let mut con = self.conn.clone();
            self.bounded(pipe.query_async::<()>(&mut con)).await?;
            return Ok(version);
        }
        let script = match lease {
            None => &self.scripts.put,
            Some(_) => &self.scripts.save,
        };
        let staging = self.keys.staging(run);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&doc_key)
            .key(self.keys.docs(run))
            .key(self.keys.runs())
            .key(&staging);
        invocation
            .arg(doc.as_str())
            .arg(run.as_str())
            .arg(mode_arg)
            .arg(expected);
        if let Some(lease) = lease {
            invocation.key(self.keys.lock(lease.key()));
            invocation
                .arg(lease.owner().id())
                .arg(lease.fence().to_string())
                .arg(if release { "1" } else { "0" });
        }
        // The document is staged by a plain HSET in the same transaction;
        // the script renames it into place only if every check passes.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&staging)
            .arg("version")
            .arg(version.as_str())
            .arg("data")
            .arg(bytes.as_ref())
            .ignore()
            .invoke_script(&invocation);
        let replies = self.transact(&pipe, script).await?;
        let mut reply = Reply::parse(
            replies
                .into_iter()
                .next()
                .ok_or_else(|| unexpected("no reply"))?,
        )?;
        match reply.status.as_str() {
            "ok" => Ok(version),
            "exists" => Err(
                Error::new(ErrorKind::AlreadyExists, "the document already exists")
                    .with_backend(BACKEND),
            ),
            "precondition" => Err(Error::new(
                ErrorKind::Precondition,
                match mode {
                    PutMode::Update(v) => format!("the stored version is not the expected {v}"),
                    _ => "the stored version differs".to_owned(),
                },
            )
            .with_backend(BACKEND)),
            "fenced" => {
                let Some(lease) = lease else {
                    return Err(unexpected("fenced without a lease"));
                };
                let mut error = Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "lease with fence {} is no longer the current grant of its lock; nothing was written",
                        lease.fence()
                    ),
                )
                .with_backend(BACKEND)
                .with_lock(lease.key());
                if let Some(holder) = reply.maybe_holder(lease.key())? {
                    error = error.with_holder(holder);
                }
                Err(error)
            }
            "foreign" => {
                let key = LockKey::Doc(run.clone(), doc.clone());
                let op = if release {
                    Operation::SaveAndRelease
                } else {
                    Operation::Put
                };
                Err(Self::weppcloud_locked(&key, &mut reply, op))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn lease_call(&self, lease: &Lease, ttl: Option<u64>, op: Operation) -> Result<()> {
        let key = lease.key();
        let mut invocation = match ttl {
            Some(_) => self.scripts.renew.prepare_invoke(),
            None => self.scripts.release.prepare_invoke(),
        };
        invocation.key(self.keys.lock(key));
        invocation
            .arg(lease.owner().id())
            .arg(lease.fence().to_string());
        if let Some(ms) = ttl {
            invocation.arg(ms);
        }
        let mut reply = self.invoke(&invocation).await?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            "lost" => {
                let holder = reply.maybe_holder(key)?;
                let why = match &holder {
                    Some(h) if h.fence != lease.fence() => {
                        "the lock was taken over by a newer grant"
                    }
                    Some(_) => "the lock is held by another owner",
                    None => "the lease expired, was released or was broken",
                };
                let mut error = Error::new(ErrorKind::LeaseLost, why)
                    .with_backend(BACKEND)
                    .with_operation(op)
                    .with_lock(key);
                if let Some(holder) = holder {
                    error = error.with_holder(holder);
                }
                Err(error)
            }
            other => Err(unexpected(other)),
        }
    }
}

/// A new version token: 128 random bits in hex. Versions are compared only
/// for equality, so they need to be unique, not ordered.
fn new_version() -> Version {
    Version::new(format!(
        "{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    ))
}

fn too_large(size: i64, limit: Option<u64>) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!(
            "document is {size} bytes, over the limit of {}",
            limit.map_or_else(|| "?".to_owned(), |l| l.to_string())
        ),
    )
    .with_backend(BACKEND)
}

impl Reply {
    fn text_opt(&mut self) -> Result<Option<String>> {
        match self.bytes()? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| unexpected("version")),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

#[async_trait]
impl Store for RedisStore {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let inner = &self.inner;
        let key = inner.keys.doc(run, doc);
        let outcome = async {
            match options.limit {
                None => {
                    let mut con = inner.conn.clone();
                    let (version, data): (Option<String>, Option<Vec<u8>>) = inner
                        .bounded(
                            redis::cmd("HMGET")
                                .arg(&key)
                                .arg("version")
                                .arg("data")
                                .query_async(&mut con),
                        )
                        .await?;
                    Ok(version.zip(data).map(|(version, data)| StoredDoc {
                        bytes: Bytes::from(data),
                        version: Version::new(version),
                    }))
                }
                Some(limit) => {
                    let mut invocation = inner.scripts.get_limited.prepare_invoke();
                    invocation.key(&key).arg(limit);
                    let mut reply = inner.invoke(&invocation).await?;
                    match reply.status.as_str() {
                        "ok" => {
                            let version = reply.text()?;
                            let bytes = reply.bytes()?.unwrap_or_default();
                            Ok(Some(StoredDoc {
                                bytes,
                                version: Version::new(version),
                            }))
                        }
                        "absent" => Ok(None),
                        "toolarge" => Err(too_large(reply.int()?, Some(limit))),
                        other => Err(unexpected(other)),
                    }
                }
            }
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        self.inner
            .put(run, doc, &bytes, &options.mode, options.lease, false)
            .await
            .map_err(|e| e.at_doc(Operation::Put, run, doc))
    }

    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        let inner = &self.inner;
        let mut invocation = inner.scripts.delete.prepare_invoke();
        invocation
            .key(inner.keys.doc(run, doc))
            .key(inner.keys.docs(run))
            .key(inner.keys.runs());
        invocation
            .arg(doc.as_str())
            .arg(run.as_str())
            .arg(if_version.map_or("", Version::as_str));
        let outcome = async {
            let mut reply = inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => Ok(true),
                "absent" => Ok(false),
                "precondition" => Err(Error::new(
                    ErrorKind::Precondition,
                    "the stored version is not the expected one; nothing was deleted",
                )
                .with_backend(BACKEND)),
                "foreign" => {
                    let key = LockKey::Doc(run.clone(), doc.clone());
                    Err(Inner::weppcloud_locked(&key, &mut reply, Operation::Delete))
                }
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Delete, run, doc))
    }

    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        let inner = &self.inner;
        let limit = limit.clamp(1, 10_000);
        let mut invocation = inner.scripts.list_docs.prepare_invoke();
        invocation
            .key(inner.keys.docs(run))
            .arg(after.map_or("", DocName::as_str))
            .arg(limit)
            .arg(inner.keys.doc_prefix(run));
        let outcome = async {
            let mut reply = inner.invoke(&invocation).await?;
            if reply.status != "ok" {
                return Err(unexpected(&reply.status));
            }
            let more = reply.int()? == 1;
            let mut items = Vec::new();
            while reply.has_more() {
                let name = DocName::new(reply.text()?).map_err(|_| unexpected("document name"))?;
                let version = Version::new(reply.text()?);
                let size = u64::try_from(reply.int()?).unwrap_or(0);
                items.push(DocMeta {
                    name,
                    version,
                    size,
                });
            }
            Ok(ListPage { items, more })
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::ListDocs).with_run(run))
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let inner = &self.inner;
        let limit = limit.clamp(1, 10_000);
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut con = inner.conn.clone();
        let names: Vec<String> = inner
            .bounded(
                redis::cmd("ZRANGEBYLEX")
                    .arg(inner.keys.runs())
                    .arg(min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1)
                    .query_async(&mut con),
            )
            .await
            .map_err(|e| e.with_operation(Operation::ListRuns))?;
        let more = names.len() > limit;
        let items = names
            .into_iter()
            .take(limit)
            .map(|n| RunId::new(n).map_err(|_| unexpected("run id")))
            .collect::<Result<Vec<_>>>()?;
        Ok(ListPage { items, more })
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner;
        let mut deleted = 0;
        loop {
            let mut invocation = inner.scripts.delete_run.prepare_invoke();
            invocation.key(inner.keys.docs(run)).key(inner.keys.runs());
            invocation
                .arg(run.as_str())
                .arg(inner.keys.doc_prefix(run))
                .arg(DELETE_BATCH);
            let mut reply = inner
                .invoke(&invocation)
                .await
                .map_err(|e| e.with_operation(Operation::DeleteRun).with_run(run))?;
            match reply.status.as_str() {
                "ok" => {
                    deleted += u64::try_from(reply.int()?).unwrap_or(0);
                    if reply.int()? == 0 {
                        return Ok(deleted);
                    }
                }
                "foreign" => {
                    let key = LockKey::Run(run.clone());
                    return Err(Inner::weppcloud_locked(
                        &key,
                        &mut reply,
                        Operation::DeleteRun,
                    ));
                }
                other => return Err(unexpected(other)),
            }
        }
    }
}

#[async_trait]
impl Lock for RedisStore {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.inner
            .acquire(key, owner, ttl, None, Operation::Acquire)
            .await
            .map(|(lease, _)| lease)
            .map_err(|e| e.with_operation(Operation::Acquire).with_lock(key))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let key = lease.key();
        let ms = Inner::ttl_ms(key, ttl, Operation::Renew)?;
        let issued = Instant::now();
        self.inner
            .lease_call(lease, Some(ms), Operation::Renew)
            .await
            .map_err(|e| e.with_operation(Operation::Renew).with_lock(key))?;
        Ok(lease.renewed(ttl, issued))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let outcome = self
            .inner
            .lease_call(lease, None, Operation::Release)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()));
        self.inner.signals.released(lease.key());
        outcome
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let inner = &self.inner;
        let mut invocation = inner.scripts.inspect.prepare_invoke();
        invocation.key(inner.keys.lock(key));
        let outcome = async {
            let mut reply = inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => Ok(Some(reply.holder(key)?)),
                "free" => Ok(None),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::Inspect).with_lock(key))
    }

    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let inner = &self.inner;
        let mut invocation = inner.scripts.break_lock.prepare_invoke();
        invocation
            .key(inner.keys.lock(key))
            .arg(only_fence.map_or_else(String::new, |f| f.to_string()));
        let outcome = async {
            let mut reply = inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => {
                    let broken = reply.holder(key)?;
                    tracing::warn!(
                        lock = %key,
                        holder = %broken.owner,
                        fence = %broken.fence,
                        by = %format!("{}:{}", runstate_core::process::hostname(), std::process::id()),
                        "lease broken"
                    );
                    Ok(Some(broken))
                }
                "free" => Ok(None),
                other => Err(unexpected(other)),
            }
        };
        let outcome = outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::BreakLock).with_lock(key));
        inner.signals.released(key);
        outcome
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let inner = &self.inner;
        let runs = match run {
            Some(run) => vec![run.clone()],
            None => {
                let mut con = inner.conn.clone();
                let names: Vec<String> = inner
                    .bounded(
                        redis::cmd("ZRANGE")
                            .arg(inner.keys.lock_runs())
                            .arg(0)
                            .arg(-1)
                            .query_async(&mut con),
                    )
                    .await
                    .map_err(|e| e.with_operation(Operation::ListLocks))?;
                names
                    .into_iter()
                    .filter_map(|n| RunId::new(n).ok())
                    .collect()
            }
        };
        let mut locks = Vec::new();
        for run in runs {
            let mut invocation = inner.scripts.list_locks.prepare_invoke();
            invocation.key(inner.keys.locks(&run));
            let mut reply = inner
                .invoke(&invocation)
                .await
                .map_err(|e| e.with_operation(Operation::ListLocks).with_run(&run))?;
            let mut found = Vec::new();
            while reply.has_more() {
                let lock_key = reply.text()?;
                let key = inner
                    .keys
                    .parse_lock(&run, &lock_key)
                    .ok_or_else(|| unexpected("lock key"))?;
                found.push(reply.holder(&key)?);
            }
            found.sort_by(|a, b| a.key.cmp(&b.key));
            locks.extend(found);
        }
        Ok(locks)
    }

    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        self.inner.signals.wait(key, max).await;
    }

    async fn acquire_and_load(
        &self,
        key: &LockKey,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
        options: GetOptions,
    ) -> Result<(Lease, Option<StoredDoc>)> {
        let op = Operation::AcquireAndLoad;
        key.check_covers(key.run(), doc)
            .map_err(|e| e.with_backend(BACKEND).with_operation(op))?;
        self.inner
            .acquire(key, owner, ttl, Some((doc, options)), op)
            .await
            .map_err(|e| e.with_operation(op).with_lock(key).with_doc(doc))
    }

    async fn save_and_release(
        &self,
        lease: &Lease,
        doc: &DocName,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Version> {
        let run = lease.key().run();
        let outcome = self
            .inner
            .put(run, doc, &bytes, &mode, Some(lease), true)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc));
        self.inner.signals.released(lease.key());
        outcome
    }
}
