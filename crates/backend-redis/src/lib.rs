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
//! Readable with `redis-cli`; see the [`keys`](crate#key-layout) table.
//! Every key of a run carries the hash tag `{<run>}`, so a run's keys share
//! one slot:
//!
//! ```text
//! <prefix>:{<run>}:doc:<name>     hash: version (128-bit token unique to the write), data (exactly the saved bytes)
//! <prefix>:{<run>}:docs           zset of document names      (listing never uses KEYS)
//! <prefix>:{<run>}:lock[:<name>]  hash: owner, oid, fence, since, ttl; expires by PEXPIRE
//! <prefix>:{<run>}:fence[:<name>] last fence of that lock (no TTL)
//! <prefix>:{<run>}:watermark[:<name>]  highest fence of that lock granted by another lock service (no TTL)
//! <prefix>:{<run>}:locks          set of the run's lock keys ever granted
//! <prefix>:{<run>}:milestones     hash: timestamps:<task> (epoch seconds), attrs:<name>
//! <prefix>:{<run>}:status         stream of status messages: topic, text, at (ms)
//! <prefix>:runs                   zset of runs with documents (listed by ZRANGEBYLEX pages; one server only)
//! <prefix>:{<run>}:staging        a write's bytes, only ever inside its MULTI/EXEC
//! ```
//!
//! and two pub/sub channels per run, `<prefix>:{<run>}:events` (what the
//! write scripts announce) and `<prefix>:{<run>}:status:live` (status
//! messages as published). Channels are shared by every database of a
//! server, so on database `N` other than 0 both names end in `:db<N>`:
//! stores with one prefix on two databases never hear each other.
//!
//! There is no store-wide index of locks (earlier versions kept a
//! `<prefix>:lockruns` zset, no longer read or written): `list_locks(None)`
//! finds lock hashes with `SCAN MATCH <prefix>:{*}:lock*` and reads their
//! holders in pipelined batches, a few round trips for any number of runs
//! (`SCAN` walks the whole database, so its cost grows with every key in
//! it, not only this store's).
//!
//! ## Watching runs, waiting for locks
//!
//! Every write announces itself **from the script (or transaction) that
//! makes it**, with a `PUBLISH` on the run's events channel: `c <version>
//! <doc>` for a document written (put, fenced save, save-and-release),
//! `d <doc>` for one deleted (delete, and each document of a
//! `delete_run`), `r <fence>` / `r <fence> <doc>` for a run / document lock
//! released (release, save-and-release, break). The announcement is atomic
//! with the write and costs no round trip: a locked update is still two.
//!
//! Each store opens **one listener connection** (pub/sub, `SUBSCRIBE`
//! needs a connection of its own) on first use, shared by all its
//! watchers, status subscriptions and lock waiters, rather than one per
//! watcher. It subscribes to a run's channels while someone in this
//! process follows them (and 10 s longer), reconnects by itself (50 ms to
//! 2 s apart), checks an idle connection with `PING` every 15 s, and is
//! closed when the store and every feed it served are dropped. A dropped
//! [`Watcher`] or [`Subscription`] stops its task at once. A run's channel
//! the server refuses to subscribe fails that `watch` or `subscribe` with
//! the refusal (`Denied` for an ACL's channel patterns; a feed already
//! following it ends with that error); the other channels are not held up.
//!
//! - [`Store::watch`] subscribes before it returns, then reports every
//!   acknowledged write on its own, in order
//!   (`WatchMode::Native { every_write: true }`). After the listener
//!   reconnected, each watcher gets `Resync` (what was announced meanwhile
//!   was not heard); a watcher that does not keep up gets `Resync` from its
//!   feed.
//! - [`Lock::wait_for_release`] returns as soon as the grant that refused
//!   this process's acquire is known released: announced by any process,
//!   or released through this store (which wakes a local waiter at once,
//!   the announcement then wakes nobody twice). One waiter per release,
//!   per process. A lease that merely expires announces nothing (Redis
//!   runs no script on expiry), and neither does a WEPPcloud lock: then the
//!   wait ends with its bound, which the wait policy keeps within the
//!   holder's remaining TTL. The first wait on a run subscribes and returns
//!   at once (announcements before it may have been missed); later ones,
//!   while the subscription lingers, sleep until woken. After a reconnect
//!   every waiter is woken.
//!
//! ## Status messages and milestones
//!
//! Status messages are a capped stream per run (`status_history` messages, 1000 by default,
//! and optionally `status_minutes`; see [`RedisConfig`]), one script
//! appends, trims and announces; the message id is the stream id. A
//! subscription replays from the stream (`XRANGE`, `XREVRANGE … COUNT n`),
//! then follows the announcements through the listener, and after a
//! reconnect re-reads the stream from its last message, so it reports
//! `Resync` only when messages it missed may have been trimmed or deleted
//! meanwhile (its last message is gone and newer ones are there, or the
//! stream is gone; see the `status` module) or when its own feed
//! overflowed. Milestones are WEPPcloud's per-run hash
//! fields `timestamps:<task>` (epoch seconds, fractional when the time has
//! a fraction) and `attrs:<name>`, each set by one `HSET`: atomic per
//! field, no lock. [`Store::delete_run`] deletes the run's milestones and
//! status history with its last documents (they describe the run); fence
//! counters and watermarks stay.
//!
//! ## Split stores and caches
//!
//! As the document store of a split store, [`Store::claim`] raises the
//! lock's watermark (`<prefix>:{<run>}:watermark[:<name>]`) to the fence
//! the other lock service granted, in one script, and reads the document
//! with an `HMGET` in the same `MULTI/EXEC` (the bytes never pass through
//! Lua; with a size limit the script checks the size and reads). A put
//! with [`PutOptions::foreign_lease`] is refused with `Fenced`, writing
//! nothing, when that lease's fence is below its lock's watermark, and
//! raises the watermark, in the same script as the write and its mode
//! check. Watermarks are kept per lock, apart from this store's own fence
//! counters, never expire and are kept by `delete_run`; they last as long
//! as the server keeps its data (like the fence counters; unlike them they
//! cannot fall back on the clock, since the fences are another service's).
//! [`Store::get_if_changed`] is one script that answers `Unchanged`
//! without sending the document, whatever its size.
//!
//! ## Guarantees and their limits
//!
//! - Expiry uses the server's clock only (`PEXPIRE`, `PTTL`, `TIME` inside
//!   scripts). A fenced save checks, in the same script as the write, that
//!   the lock key still holds the lease's owner id and fence: an expired
//!   lease has no key, a newer grant has another fence.
//! - Fence counters live in the run's slot beside the data they protect.
//!   Every grant's fence is `max(last fence + 1, server clock in µs)`
//!   (one `TIME` inside the acquire script), so fences strictly increase
//!   even when the counter goes back: a server that keeps nothing on disk,
//!   a restart from an older RDB snapshot or a truncated AOF, a replica
//!   promoted before it saw the last grants. A client still holding a lease
//!   from before such a loss gets `LeaseLost`/`Fenced`. The one limit: the
//!   server's clock must not step back by more than the time the restart
//!   or failover took. Versions are 128-bit tokens unique to a write (64
//!   random bits, the writing process's id and its count of writes), so a
//!   version from before a restart never matches a document written after
//!   it.
//! - TTLs are checked by [`runstate_core::check_ttl`] before anything is
//!   sent, and again at the top of every script before any write; a lock
//!   hash is never left without its expiry (see the scripts' order). A TTL
//!   is sent in whole milliseconds, rounded up, so the server never expires
//!   a lease before its holder's local deadline.
//! - Acquiring is idempotent by owner id: the same owner asking again
//!   while its grant is live gets that grant back (same fence, same
//!   `since`, TTL restarted), so a retry after a lost reply does not wait
//!   a whole TTL behind itself.
//! - [`save_and_release`](Lock::save_and_release) releases the lease on
//!   every failure except `Fenced`/`LeaseLost`: refused conditions and
//!   command errors (a document key of the wrong type, say) inside the
//!   script, and, with a separate release, failures before or around it (a
//!   lease that does not cover the document, a transaction the server
//!   refused, a lost connection).
//! - Every write stages its bytes with a plain `HSET` (after a `DEL` of
//!   the staging key) and a script in the same `MULTI/EXEC` checks and
//!   renames them into place, indexes and announces the write, so no
//!   write copies the document through Lua and a write the server refuses
//!   (a document key of the wrong type) indexes and announces nothing.
//! - Batches are native, one round trip per pipeline of up to 256
//!   documents: [`Store::get_many`] pipelines the reads `get` sends;
//!   [`Store::put_many`] pipelines the writes `put` sends, each in its own
//!   `MULTI/EXEC` (all or nothing and conditional on its own mode,
//!   announced by its own script or transaction, a refused one stopping
//!   none of the others; the batch as a whole is not one transaction).
//!   After `NOSCRIPT` only the documents the server refused for it are
//!   sent again, and a batch writing a document more than once sends its
//!   `n`-th writes in an `n`-th pipeline, so writes of a document keep
//!   their order. With `wait_replicas` the `WAIT` rides in the pipeline.
//!   A run's keys share one slot, so on a cluster a batch of reads is one
//!   pipeline to one primary; a batch of writes goes one write at a time
//!   there, since the cluster client sends a whole pipeline again after a
//!   redirect, and an overwrite of it that had committed would be made
//!   again (after another client's write, bringing the older bytes back).
//! - Every script touches only its run's keys (one slot). On one server,
//!   document writes also maintain the store-wide `runs` index; on a
//!   cluster they do not (see [below](crate#redis-cluster)). The
//!   announcements are plain `PUBLISH`es on channels named with the run's
//!   hash tag.
//!
//! ## Redis Cluster
//!
//! `redis+cluster://[user[:password]@]host:port,host:port/?prefix=…`
//! opens the store on a Redis Cluster through those seed nodes (the others
//! are discovered; database 0 only; `weppcloud_locks` needs a standalone
//! server), with redis-rs's cluster client, which sends each script and
//! transaction to the primary of its run's slot and follows `MOVED`/`ASK`
//! and failovers by itself. [`RedisConfig::cluster`] builds the same in
//! Rust. The same scripts run there, with these differences:
//!
//! - No store-wide key is written: the scripts get the run's own `docs`
//!   index where the `runs` index would be, and skip it. [`Store::list_runs`]
//!   finds runs by `SCAN MATCH <prefix>:{*}:docs` on every primary (a run's
//!   index exists exactly while it has documents), then sorts and pages
//!   them, so each page costs a walk of the keyspace.
//!   `list_locks(None)` and [`RedisStore::purge_prefix`] also `SCAN` every
//!   primary; `list_locks(None)` reads holders one call per lock. The
//!   primaries come from `CLUSTER SLOTS` (a node that never met another
//!   announces no host there, and is walked all the same), each reached
//!   through a slot it serves, and must answer as itself (`CLUSTER MYID` in
//!   the same request: for a primary it is not connected to, the cluster
//!   client picks any other node; after a wrong node the store sends a
//!   keyed `EXISTS` for the slot, under its prefix, to another primary,
//!   whose redirect makes the client read the layout, and tries once more).
//!   A user restricted by ACLs needs `cluster|slots`, `cluster|myid`, `scan`
//!   and `exists` on the store's keys for these walks; `CLUSTER MYID` is
//!   not offered by some hosted Redis services, where walks fail. A walk fails,
//!   retryable, when a slot is unserved, a primary is down or the layout
//!   changed before it ended,
//!   instead of listing part of the keys; on a cluster that serves some
//!   slots nowhere for good (`cluster-require-full-coverage no`), every
//!   walk fails. Keys that move one by one while a slot is resharded can
//!   be missed by a walk that meets them on neither side.
//! - A request whose connection dropped before the reply came may have
//!   been run. The cluster client sends it again, possibly to a node that
//!   does not serve its slot while it reconnects; that node aborts a
//!   transaction without running any of it (`EXECABORT` for a `MOVED`),
//!   and the store sends such a transaction again after a short pause (up
//!   to 4 times, within the call's bound; then a retryable error). A
//!   write sent again finds its own version in place (versions are unique
//!   to a write) and answers `applied`, reported as the success it was,
//!   instead of failing on its own first run (`AlreadyExists`,
//!   `Precondition`, or `Fenced` for a save-and-release whose first run
//!   released the lease). Not recognised: a write sent again after another
//!   client's write replaced its version (a waiter its release woke took
//!   the lock and saved in between) answers as refused (`AlreadyExists`,
//!   `Precondition`, `Fenced`), so a typed update can then run its
//!   closure a second time; an overwrite sent again after another client's
//!   write is made again, as a late overwrite would be;
//!   a release sent again reports `LeaseLost` (the lease "expired, was
//!   released or was broken"), a delete `false`, a forced release the lock
//!   free. Tested through a proxy in front of every node that loses a
//!   write's reply (tests/cluster_faults.rs).
//! - A regular `PUBLISH` reaches every node of a cluster, so the listener
//!   subscribes through one node, and after any failure reconnects to the
//!   next seed; watchers then get `Resync`, as after any reconnect.
//! - Replication is asynchronous: a primary that dies can take writes it had
//!   acknowledged with it. `?wait_replicas=N` (and `wait_timeout_ms`, 1000
//!   by default; [`RedisConfig::with_wait_replicas`]) sends `WAIT N` in
//!   the same request as every save and every grant, right behind it, and
//!   fails the call with a retryable `Backend` error when fewer replicas
//!   acknowledged in time (the write was made, and a failover may lose it;
//!   a retried acquire by the same owner gets its grant back). The same
//!   request, because `WAIT` counts from its connection's replication
//!   offset: sent alone, after the connection dropped and the cluster
//!   client reconnected, it could be a new connection's first command,
//!   which counts every connected replica at once. A grant's request
//!   carries its `WAIT` whatever the script answers, so a refused acquire
//!   (the lock held) waits for replicas too. While a `WAIT` waits, the
//!   store's other requests to that node queue behind it on the shared
//!   connection, so keep `wait_timeout_ms` short. It also works on one
//!   server with replicas. The failover test (tests/cluster_faults.rs: four
//!   tasks making locked increments, the replica stopped and its link cut
//!   for 400 ms, the primary then killed and the replica promoted) lost 221
//!   of 2,877 and 45 of 2,948 acknowledged updates without it (two runs) and
//!   0 of 1,091 and 0 of 805 with `wait_replicas=1` (measured with the
//!   `WAIT` sent as a request of its own; every CI run asserts 0 with it);
//!   fences kept increasing in both, since every fence is at least the
//!   server clock in µs.
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
//!
//! That is this store honouring WEPPcloud's locks on documents *it*
//! holds. To work in WEPPcloud's own run folders beside its workers, use
//! the other mode: [`WeppcloudService`] (a Redis URL with `weppcloud=true`
//! as the lock service of a file store), whose leases on controllers *are*
//! WEPPcloud's NoDb locks, taken and released as WEPPcloud does, and which
//! keeps WEPPcloud's cache coherent (see the [`weppcloud`] module).

#![forbid(unsafe_code)]

mod batch;
mod cache;
mod config;
mod conn;
mod engine;
mod errors;
mod keys;
mod leases;
mod listener;
mod reply;
#[cfg(test)]
mod resend;
mod scripts;
mod status;
pub mod weppcloud;
mod writes;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Value};
use runstate_core::events::{AbortOnDrop, FEED_CAPACITY, check_label, check_text};
use runstate_core::time::unix_millis;
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, DocStat, Error, ErrorKind, Fence, Fetched, GetOptions,
    Lease, ListPage, Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutMode, PutOptions,
    PutRequest, Replay, Result, RunId, Store, StoredDoc, Subscription, Version, WatchMode, Watcher,
    async_trait,
};

pub use cache::{DEFAULT_CACHE_TTL, MAX_CACHE_TTL, RedisCache};
pub use config::{
    Address, DEFAULT_PREFIX, DEFAULT_STATUS_HISTORY, DEFAULT_TIMEOUT, DEFAULT_WAIT_TIMEOUT,
    MAX_STATUS_HISTORY, RedisConfig, Secret, WeppcloudLocks,
};
pub use weppcloud::{WeppcloudConfig, WeppcloudService};

use crate::conn::Conn;
use crate::errors::{map_redis_error, unexpected, within};
use crate::keys::Keys;
use crate::listener::{Kind, Listener, Note, StoreKeys, Waits};
use crate::reply::{Reply, read_hmget, read_limited, stored_of, too_large};
use crate::scripts::Scripts;

/// The backend's name in errors and capabilities.
pub const BACKEND: &str = "redis";

/// Documents deleted per script call by `delete_run`, so a huge run never
/// blocks the server for long.
const DELETE_BATCH: usize = 500;

/// Redis's largest bulk string.
pub(crate) const MAX_DOCUMENT: u64 = 512 * 1024 * 1024;

/// Whether `len` bytes are over what one Redis value holds: sent, the
/// server would close the connection (failing every request sharing it).
pub(crate) fn over_a_value(len: usize) -> bool {
    u64::try_from(len).map_or(true, |len| len > MAX_DOCUMENT)
}

/// Keys asked of each `SCAN` call by `list_locks(None)`.
const SCAN_COUNT: usize = 1000;

/// Lock holders read per pipelined round trip by `list_locks(None)`.
const HOLDER_BATCH: usize = 1000;

/// The longest a lock waiter sleeps when asked for longer than a timer can
/// count.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// The Redis backend. Cheap to clone; clones share one multiplexed
/// connection that reconnects by itself.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    conn: Conn,
    /// For the listener's own connection: the server, or each seed node
    /// of a cluster (tried in turn; a `PUBLISH` reaches every node of a
    /// cluster, so any one of them hears every announcement).
    clients: Vec<redis::Client>,
    keys: StoreKeys,
    scripts: Scripts,
    capabilities: Capabilities,
    /// What waiters of this process know of the locks they wait for; local
    /// releases and announced ones wake them.
    waits: Arc<Waits>,
    /// The pub/sub connection, opened on first use.
    listener: OnceLock<Arc<Listener>>,
}

fn connection_info(config: &RedisConfig) -> Result<redis::ConnectionInfo> {
    let addr = match &config.address {
        Address::Tcp { host, port } => ConnectionAddr::Tcp(host.clone(), *port),
        #[cfg(feature = "tls")]
        Address::Tls { host, port } => {
            crate::config::ensure_crypto_provider();
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        }
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
    let info = addr
        .into_connection_info()
        .map_err(map_redis_error)?
        .set_redis_settings(settings);
    #[cfg(feature = "tls")]
    let info = crate::config::with_tls_ca(info, config)?;
    Ok(info)
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
        let bound = config.connect_timeout * 3;
        if config.cluster_wanted || !config.cluster.is_empty() {
            return Self::open_cluster(config).await.map_err(context);
        }
        let client = redis::Client::open(connection_info(&config).map_err(context)?)
            .map_err(|e| context(map_redis_error(e)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = within(
            bound,
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        .map_err(context)?;
        Self::assemble(config, Conn::Single(conn), vec![client])
            .await
            .map_err(context)
    }

    /// Opens a store on a Redis Cluster through its seed nodes.
    async fn open_cluster(config: RedisConfig) -> Result<RedisStore> {
        // The URL checks this as it parses; a configuration built in Rust
        // is checked here.
        config.check_cluster()?;
        let bound = config.connect_timeout * 3;
        let mut seeds = Vec::with_capacity(config.cluster.len());
        for (host, port) in &config.cluster {
            let node = RedisConfig {
                address: Address::Tcp {
                    host: host.clone(),
                    port: *port,
                },
                ..config.clone()
            };
            seeds.push(connection_info(&node)?);
        }
        let clients = seeds
            .iter()
            .map(|info| redis::Client::open(info.clone()).map_err(map_redis_error))
            .collect::<Result<Vec<_>>>()?;
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.timeout);
        if let Some(user) = &config.username {
            builder = builder.username(user);
        }
        if let Some(password) = &config.password {
            builder = builder.password(password.expose());
        }
        let cluster = builder.build().map_err(map_redis_error)?;
        let conn = within(bound, cluster.get_async_connection()).await?;
        Self::assemble(config, Conn::Cluster(conn), clients).await
    }

    /// A store on a connection the caller already has (bring your own
    /// client, as tower-sessions' stores take theirs): every command goes
    /// through `conn`; `config` gives the prefix, the bounds and the
    /// options, and its address is where the store opens its one pub/sub
    /// connection (for watchers, status feeds and lock waiters) when first
    /// needed. The scripts are loaded before this returns.
    ///
    /// # Errors
    /// `Config` for settings the server refuses (or `rediss://` without
    /// the `tls` feature), and for a manager on another database than the
    /// configuration's (as its connection info says; set the
    /// configuration's `db` to it); `Timeout` or a retryable `Backend`
    /// error when the scripts cannot be loaded.
    pub async fn from_connection_manager(
        conn: ConnectionManager,
        config: RedisConfig,
    ) -> Result<RedisStore> {
        let context = |e: Error| e.with_operation(Operation::Open);
        // The scripts reach WEPPcloud's database (and name the store's
        // channels) by `config.db`: a connection on another database would
        // look for WEPPcloud's locks where they are not.
        let db = conn.get_db();
        if db != config.db {
            return Err(context(config::config_error(format!(
                "the connection manager is on database {db} and the configuration says {}: \
                 set the configuration's database to the connection's",
                config.db
            ))));
        }
        let client = redis::Client::open(connection_info(&config).map_err(context)?)
            .map_err(|e| context(map_redis_error(e)))?;
        Self::assemble(config, Conn::Single(conn), vec![client])
            .await
            .map_err(context)
    }

    /// Loads the scripts through `conn` and builds the store.
    async fn assemble(
        config: RedisConfig,
        mut conn: Conn,
        clients: Vec<redis::Client>,
    ) -> Result<RedisStore> {
        let scripts = Scripts::new(config.weppcloud.as_ref(), config.db);
        for script in scripts.all() {
            // On a cluster, SCRIPT LOAD goes to every primary (and a
            // promoted replica that lacks a script gets it on NOSCRIPT).
            within(config.timeout, script.load_async(&mut conn)).await?;
        }
        let cluster = conn.is_cluster();
        tracing::debug!(server = %config.address, db = config.db, prefix = %config.prefix, cluster, "redis store open");
        Ok(RedisStore {
            inner: Arc::new(Inner {
                keys: StoreKeys::new(Keys::new(&config.prefix), config.db),
                config,
                conn,
                clients,
                scripts,
                capabilities: Capabilities::full(BACKEND)
                    .with_multi_host(true)
                    .with_max_document_size(Some(MAX_DOCUMENT))
                    .with_foreign_fencing(true)
                    .with_native_conditional_get(true)
                    .with_watch(WatchMode::Native { every_write: true })
                    .with_status(true)
                    .with_milestones(true),
                waits: Arc::new(Waits::default()),
                listener: OnceLock::new(),
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

    /// Deletes this store's keys, with `SCAN` and `UNLINK` (never `KEYS` or
    /// `FLUSHDB`), and returns how many: its runs' keys, its store-wide
    /// index and the copies of a [`RedisCache`] under the same prefix, not
    /// the keys of a store whose prefix extends this one (`p:q` beside
    /// `p`, though a store named `p:cache` shares the cache's key space).
    /// For tests and for decommissioning a namespace.
    ///
    /// # Errors
    /// Connection errors and timeouts.
    pub async fn purge_prefix(&self) -> Result<u64> {
        let mut con = self.inner.conn.clone();
        let (patterns, named) = self.inner.keys.own();
        let mut keys = Vec::from(named);
        for pattern in &patterns {
            keys.extend(self.inner.scan(pattern).await?);
        }
        keys.sort_unstable();
        keys.dedup();
        let mut removed = 0;
        // On a cluster the client splits each UNLINK by slot.
        for batch in keys.chunks(1000) {
            removed += self
                .inner
                .bounded(redis::cmd("UNLINK").arg(batch).query_async::<u64>(&mut con))
                .await?;
        }
        Ok(removed)
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

    /// The version and size of a document without its bytes: `HGET
    /// version` and `HSTRLEN data` in one `MULTI/EXEC` (one round trip, one
    /// consistent view). `modified` is `None`: the document hash records no
    /// time (the save scripts would need another field, so it is left out),
    /// as in [`list_docs`](Store::list_docs).
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        let inner = &self.inner;
        let key = inner.keys.doc(run, doc);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HGET")
            .arg(&key)
            .arg("version")
            .cmd("HSTRLEN")
            .arg(&key)
            .arg("data");
        let mut con = inner.conn.clone();
        let (version, size): (Option<String>, u64) = inner
            .bounded(pipe.query_async(&mut con))
            .await
            .map_err(|e| e.at_doc(Operation::Head, run, doc))?;
        Ok(version.map(|version| DocStat::new(Version::new(version), size, None)))
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
                    let reply: Value = inner
                        .bounded(con.req_packed_command(
                            redis::cmd("HMGET").arg(&key).arg("version").arg("data"),
                        ))
                        .await?;
                    read_hmget(reply)
                }
                Some(limit) => {
                    let mut invocation = inner.scripts.get_limited.prepare_invoke();
                    invocation.key(&key).arg(limit);
                    read_limited(inner.invoke(&invocation).await?, limit)
                }
            }
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::Get, run, doc))
    }

    /// One pipeline per 256 documents (see the crate documentation); each
    /// document's result is what [`get`](Store::get) would give.
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        self.inner
            .get_many(run, docs, options)
            .await
            .map_err(|e| e.at_run(Operation::GetMany, run))
    }

    /// One pipeline per 256 writes, each write its own `MULTI`/`EXEC` (on a
    /// cluster, one write at a time; see the crate documentation); each
    /// write's result is what [`put`](Store::put) would give.
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        self.inner
            .put_many(run, &puts)
            .await
            .map_err(|e| e.at_run(Operation::PutMany, run))
    }

    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        self.inner
            .put(
                run,
                doc,
                &bytes,
                &options.mode,
                options.lease,
                options.foreign_lease,
                false,
            )
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
            .key(inner.runs_key(run));
        invocation
            .arg(doc.as_str())
            .arg(run.as_str())
            // `=` and the version, or nothing for any version: an empty
            // version (stored ones never are) must not read as "any".
            .arg(if_version.map_or_else(String::new, |v| format!("={v}")))
            .arg(inner.keys.events(run));
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
                // No write time: the document hash records none (see `head`).
                items.push(DocMeta::new(name, version, size, None));
            }
            Ok(ListPage::new(items, more))
        };
        outcome
            .await
            .map_err(|e: Error| e.at_run(Operation::ListDocs, run))
    }

    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        let inner = &self.inner;
        let limit = limit.clamp(1, 10_000);
        if inner.conn.is_cluster() {
            return inner
                .cluster_runs(after, limit)
                .await
                .map_err(|e| e.with_operation(Operation::ListRuns));
        }
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
        Ok(ListPage::new(items, more))
    }

    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner;
        let mut deleted = 0;
        loop {
            let mut invocation = inner.scripts.delete_run.prepare_invoke();
            invocation
                .key(inner.keys.docs(run))
                .key(inner.runs_key(run))
                .key(inner.keys.milestones(run))
                .key(inner.keys.status(run));
            invocation
                .arg(run.as_str())
                .arg(inner.keys.doc_prefix(run))
                .arg(DELETE_BATCH)
                .arg(inner.keys.events(run));
            let mut reply = inner
                .invoke(&invocation)
                .await
                .map_err(|e| e.at_run(Operation::DeleteRun, run))?;
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

    async fn get_if_changed(
        &self,
        run: &RunId,
        doc: &DocName,
        known: &Version,
        options: GetOptions,
    ) -> Result<Fetched> {
        let inner = &self.inner;
        let mut invocation = inner.scripts.get_if_changed.prepare_invoke();
        invocation
            .key(inner.keys.doc(run, doc))
            .arg(known.as_str())
            .arg(options.limit.map_or_else(String::new, |l| l.to_string()));
        let outcome = async {
            let mut reply = inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "unchanged" => Ok(Fetched::Unchanged),
                "absent" => Ok(Fetched::Absent),
                "changed" => {
                    let version = Version::new(reply.text()?);
                    let bytes = reply.bytes()?.unwrap_or_default();
                    Ok(Fetched::Changed(StoredDoc::new(bytes, version)))
                }
                "toolarge" => Err(too_large(reply.int()?, options.limit)),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e| e.at_doc(Operation::GetIfChanged, run, doc))
    }

    /// One script raises the watermark; without a size limit the document
    /// is read by an HMGET in the same MULTI/EXEC (one round trip, the
    /// bytes never pass through Lua), with one the script checks the size
    /// first.
    async fn claim(
        &self,
        key: &LockKey,
        fence: Fence,
        doc: Option<&DocName>,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        let inner = &self.inner;
        let op = Operation::Claim;
        let run = key.run();
        let outcome = async {
            if let Some(doc) = doc {
                key.check_covers(run, doc)?;
            }
            let mut invocation = inner.scripts.claim.prepare_invoke();
            invocation
                .key(inner.keys.watermark(key))
                .key(match doc {
                    Some(doc) => inner.keys.doc(run, doc),
                    None => inner.keys.docs(run),
                })
                .arg(fence.to_string())
                .arg(if doc.is_some() && options.limit.is_some() {
                    "1"
                } else {
                    "0"
                })
                .arg(options.limit.map_or_else(String::new, |l| l.to_string()));
            // With `wait_replicas`, the raised watermark is acknowledged by
            // the replicas as grants are (a `WAIT` in the same request): a
            // failover that lost it would let the older holder's late save
            // through, after `claim` said it could not.
            let wait = inner.config.wait_replicas > 0;
            let mut acked = None;
            let (mut reply, loaded) = match doc {
                Some(doc) if options.limit.is_none() => {
                    let mut pipe = redis::pipe();
                    if !wait {
                        pipe.atomic();
                    }
                    pipe.invoke_script(&invocation)
                        .cmd("HMGET")
                        .arg(inner.keys.doc(run, doc))
                        .arg("version")
                        .arg("data");
                    let replies = if wait {
                        let (replies, wait) =
                            inner.script_then_wait(pipe, &inner.scripts.claim).await?;
                        acked = Some(wait);
                        replies
                    } else {
                        inner.transact(&pipe, &inner.scripts.claim, None).await?
                    };
                    let mut replies = replies.into_iter();
                    let (Some(first), Some(second)) = (replies.next(), replies.next()) else {
                        return Err(unexpected("transaction replies"));
                    };
                    (Reply::parse(first)?, Some(second))
                }
                _ if wait => {
                    let (reply, wait) = inner
                        .invoke_then_wait(&invocation, &inner.scripts.claim)
                        .await?;
                    acked = Some(wait);
                    (reply, None)
                }
                _ => (inner.invoke(&invocation).await?, None),
            };
            if reply.status == "ok" {
                inner.replicated(acked.as_ref())?;
            }
            match reply.status.as_str() {
                "ok" => match (doc, loaded) {
                    (None, _) => Ok(None),
                    (Some(_), Some(pair)) => stored_of(pair),
                    (Some(_), None) => match (reply.text_opt()?, reply.bytes()?) {
                        (Some(version), Some(bytes)) => {
                            Ok(Some(StoredDoc::new(bytes, Version::new(version))))
                        }
                        _ => Ok(None),
                    },
                },
                "watermark" => Err(Inner::below_watermark(key, fence, &reply.text()?)),
                "toolarge" => Err(too_large(reply.int()?, options.limit)),
                other => Err(unexpected(other)),
            }
        };
        outcome.await.map_err(|e: Error| {
            let e = e.with_operation(op).with_lock(key);
            match doc {
                Some(doc) => e.with_doc(doc),
                None => e,
            }
        })
    }

    /// Follows the run's events channel through the store's listener
    /// connection (subscribed before this returns). Every write announces
    /// itself from its own script, so every acknowledged write is reported
    /// on its own, in order; a reconnect of the listener is reported as
    /// `Resync`.
    async fn watch(&self, run: &RunId) -> Result<Watcher> {
        let inner = &self.inner;
        let (notes, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let (membership, _) = inner
            .listener()
            .join(
                inner.keys.events(run),
                run,
                Kind::Events,
                Some(notes),
                inner.config.connect_timeout + inner.config.timeout,
            )
            .await
            .map_err(|e| e.at_run(Operation::Watch, run))?;
        let (mut sender, feed) = Watcher::channel(FEED_CAPACITY);
        let run = run.clone();
        let task = tokio::spawn(async move {
            let _membership = membership;
            loop {
                let note = tokio::select! {
                    note = heard.recv() => note,
                    () = sender.closed() => return,
                };
                let open = match note {
                    Some(Note::Event(event)) => sender.send(event),
                    Some(Note::Reconnected) => sender.resync(),
                    Some(Note::Status(_)) => true,
                    Some(Note::Refused(refusal)) => {
                        sender.fail(map_redis_error(refusal).at_run(Operation::Watch, &run));
                        return;
                    }
                    // The listener's task ended: say so rather than end
                    // the feed as if the watch were over.
                    None => {
                        sender.fail(listener::stopped().at_run(Operation::Watch, &run));
                        return;
                    }
                };
                if !open {
                    return;
                }
            }
        });
        Ok(feed.keep(Arc::new(AbortOnDrop(task.abort_handle()))))
    }

    /// One script appends the message to the run's stream, trims the
    /// stream and announces the message.
    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let inner = &self.inner;
        let op = Operation::Publish;
        let context = |e: Error| e.with_backend(BACKEND).at_run(op, run);
        check_label("topic", topic).map_err(context)?;
        check_text("status message", text).map_err(context)?;
        let mut invocation = inner.scripts.publish_status.prepare_invoke();
        invocation
            .key(inner.keys.status(run))
            .arg(inner.keys.status_channel(run))
            .arg(topic)
            .arg(text)
            .arg(unix_millis(SystemTime::now()))
            .arg(inner.config.status_history)
            .arg(
                inner
                    .config
                    .status_max_age
                    .map_or_else(String::new, |age| age.as_millis().to_string()),
            );
        let reply = inner.invoke(&invocation).await.map_err(context)?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            other => Err(context(unexpected(other))),
        }
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        let inner = &self.inner;
        let context = |e: Error| e.at_run(Operation::Subscribe, run);
        let (notes, heard) = tokio::sync::mpsc::unbounded_channel();
        // Subscribed first, then the history read: a message published in
        // between is in both, and delivered once (by id).
        let (membership, _) = inner
            .listener()
            .join(
                inner.keys.status_channel(run),
                run,
                Kind::Status,
                Some(notes),
                inner.config.connect_timeout + inner.config.timeout,
            )
            .await
            .map_err(context)?;
        let (replayed, last) = inner.status_replay(run, replay).await.map_err(context)?;
        // Room for the whole replay, pushed before the consumer reads, and
        // for a buffer's worth after it: the stream keeps up to a node of
        // entries more than `status_history` (1,099 by default), and a
        // replay cut at the buffer's 1,024 lost its newest messages.
        let (sender, feed) = Subscription::channel(FEED_CAPACITY.saturating_add(replayed.len()));
        let task = tokio::spawn(status::follow(
            Arc::clone(&self.inner),
            run.clone(),
            membership,
            heard,
            sender,
            replayed,
            last,
        ));
        Ok(feed.keep(Arc::new(AbortOnDrop(task.abort_handle()))))
    }

    /// One `HSET` of the field `timestamps:<task>`.
    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        let value = status::format_timestamp(at).map_err(context)?;
        self.inner
            .set_field(run, &format!("timestamps:{task}"), &value)
            .await
            .map_err(context)
    }

    /// One `HSET` of the field `attrs:<name>`.
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::SetAttr, run);
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        self.inner
            .set_field(run, &format!("attrs:{name}"), value)
            .await
            .map_err(context)
    }

    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let inner = &self.inner;
        let mut con = inner.conn.clone();
        let fields: Vec<(String, String)> = inner
            .bounded(
                redis::cmd("HGETALL")
                    .arg(inner.keys.milestones(run))
                    .query_async(&mut con),
            )
            .await
            .map_err(|e| e.at_run(Operation::Milestones, run))?;
        Ok(status::milestones_of(fields))
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
        self.inner.waits.releasing(lease.key(), lease.fence());
        let outcome = self
            .inner
            .lease_call(lease, None, Operation::Release)
            .await
            .map_err(|e| e.with_operation(Operation::Release).with_lock(lease.key()));
        // Local waiters at once, without waiting for the announcement
        // (unless the outcome is unknown: see `settled`).
        self.inner
            .waits
            .settled(lease.key(), lease.fence(), &outcome);
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
            .arg(only_fence.map_or_else(String::new, |f| f.to_string()))
            .arg(inner.keys.events(key.run()))
            .arg(key.doc().map_or("", DocName::as_str));
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
                    inner.waits.released(key, broken.fence);
                    Ok(Some(broken))
                }
                "free" => Ok(None),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::BreakLock).with_lock(key))
    }

    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let inner = &self.inner;
        let mut locks = match run {
            Some(run) => inner
                .run_locks(run)
                .await
                .map_err(|e| e.at_run(Operation::ListLocks, run))?,
            None => inner
                .all_locks()
                .await
                .map_err(|e| e.with_operation(Operation::ListLocks))?,
        };
        locks.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(locks)
    }

    /// Returns when the grant that last refused this process's acquire of
    /// `key` is known released, or `max` has passed. Releases are learnt
    /// from the announcements of the release scripts of every process (on
    /// the run's events channel, through the store's listener) and, at
    /// once, from releases made through this store. Each release wakes one
    /// waiter of this process. A lease that expires announces nothing: the
    /// wait then ends with `max`, which the wait policy keeps within the
    /// holder's remaining TTL.
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now()
            .checked_add(max)
            .unwrap_or_else(|| tokio::time::Instant::now() + MAX_WAIT);
        let slot = inner.waits.slot(key);
        let notified = slot.notify.notified();
        tokio::pin!(notified);
        // From here on no release can slip by unnoticed.
        notified.as_mut().enable();
        if slot.free() {
            return;
        }
        let run = key.run();
        let joined = tokio::time::timeout_at(
            deadline,
            inner
                .listener()
                .join(inner.keys.events(run), run, Kind::Events, None, max),
        )
        .await;
        match joined {
            // Subscribed just now: a release announced before may have been
            // missed, so try again at once (the subscription stays a while
            // for the next wait).
            Ok(Ok((_, false))) => {}
            Ok(Ok((_following, true))) => {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
            // No listener (the server cannot be reached) or a channel the
            // server refuses: local releases and the bound only.
            _ => {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
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
        self.inner.waits.releasing(lease.key(), lease.fence());
        let outcome = self
            .inner
            .put(run, doc, &bytes, &mode, Some(lease), None, true)
            .await
            .map_err(|e| e.at_doc(Operation::SaveAndRelease, run, doc));
        self.inner
            .waits
            .settled(lease.key(), lease.fence(), &outcome);
        outcome
    }
}
