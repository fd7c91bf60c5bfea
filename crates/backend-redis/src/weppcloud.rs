//! WEPPcloud's Redis, spoken as WEPPcloud speaks it: [`WeppcloudService`],
//! the lock service of a split store whose documents are WEPPcloud's run
//! folders (`file:///runs?ext=nodb&locks=redis://…/0?weppcloud=true`).
//!
//! Everything here follows WEPPcloud's public source (`wepppy/nodb/base.py`,
//! `redis_prep.py`, `status_messenger.py`, `config/redis_settings.py`).
//!
//! ## Document locks are WEPPcloud's locks
//!
//! A runstate lease on a document lock *is* WEPPcloud's NoDb lock of that
//! controller, in the database of the URL (WEPPcloud's `RedisDB.LOCK`, 0):
//!
//! ```text
//! nodb-lock:<run>:<name>.nodb   SET … NX PX <ttl>, the payload below   (WEPPcloud: SET … NX EX <ttl>)
//! <run>                         hash field locked:<name>.nodb = true / false (WEPPcloud's mirror)
//! <prefix>:{<run>}:fence:<name> runstate's fence counter (no TTL; WEPPcloud's clear_locks pattern
//!                               nodb-lock:<run>:* does not match it, so fences survive an operator's clear)
//! ```
//!
//! The payload is WEPPcloud's compact JSON, its fields in its order and
//! types (`token`: 32 hex digits of a random UUID4, `owner`:
//! `"<host>:<pid>"`, `acquired_at` and `expires_at`: whole epoch seconds,
//! `ttl`: whole seconds, rounded up), followed by runstate's own:
//!
//! ```text
//! {"token":"3f…9a","owner":"host:1234","acquired_at":1700000000,"expires_at":1700000030,"ttl":30,
//!  "runstate":{"fence":"1700000000123456","since_ms":1700000000123,"owner":{"host":…,"pid":…,"id":…}}}
//! ```
//!
//! WEPPcloud reads `token` and `owner` (and ignores the rest), so a worker
//! that finds a runstate lease says "already locked (owner=host:1234)" and
//! never takes the controller; runstate, finding a key without its own
//! fields, reports `Locked` with WEPPcloud's host and pid (fence 0, `since`
//! its `acquired_at`, `expires_in` the key's TTL) and never takes it. The
//! token is what WEPPcloud's unlock and dump guard check, so it is never
//! shown: such a holder's owner id is `weppcloud-` and 16 hex digits of a
//! SHA-256 of it (the same for the same grant).
//! Every check and write is one script, atomic on the server:
//!
//! - **acquire**: refused while the run-replacement guard
//!   `nodb:run-replacement:<sha256("run\0" + run)>` exists (WEPPcloud's
//!   `NoDbRunReplacingError`), or while the key holds someone else's
//!   payload; otherwise `SET NX PX` with a fresh token and the next fence
//!   (`max(counter + 1, server clock in µs)`), and `locked:<name>.nodb =
//!   true`. The same owner asking again gets its grant back (same token,
//!   fence and `acquired_at`, TTL restarted).
//! - **before a save** under a document lease, the `runstate` facade
//!   checks that the key still holds the lease's token
//!   ([`WeppcloudService::check_held`]), as WEPPcloud does before every
//!   dump: an operator's `clear_locks` may end a lease early.
//! - **renew**: only with the lease's token; rewrites `expires_at` and
//!   `ttl` and restarts the key's expiry (WEPPcloud itself never renews).
//! - **release**: first deletes WEPPcloud's cache entry of the document
//!   (below), then deletes the key only if it still holds the lease's
//!   token (compare-and-delete), and sets `locked:<name>.nodb = false`. A
//!   key that is gone or holds another token is `LeaseLost`.
//! - **break** (`runstate unlock --force`): deletes the key whoever holds
//!   it, as WEPPcloud's `clear_locks` does, with the cache entry; logged.
//!
//! The key's expiry is WEPPcloud's and runstate's only judge of a lease:
//! an expired key is a free lock for both. Fences stay runstate's: the
//! document store checks them against its watermarks (a split store
//! claims every grant there before the holder reads).
//!
//! **Run locks** (`LockKey::Run`) have no WEPPcloud counterpart. They are
//! runstate's own leases (`<prefix>:{<run>}:lock`, as in
//! [`RedisStore`]), refused while the run-replacement guard exists, and
//! exclude other runstate run locks only: as in every backend, a run lock
//! does not exclude document locks, so it does not keep WEPPcloud workers
//! out of the controllers. A save under a run lease is therefore refused
//! (by the `runstate` facade) while WEPPcloud holds the controller.
//!
//! **Runs WEPPcloud names that runstate cannot.** Batch runs lock under
//! `batch;;<batch>;;<run>` and child runs under their parent's id with a
//! `_pups/…` path: neither is a runstate run id and document name, so their
//! keys are never taken, and listing skips them (with a debug message).
//! The `runstate` facade refuses to open such run folders.
//!
//! ## The cache
//!
//! WEPPcloud caches each controller in database 13 (`RedisDB.NODB_CACHE`)
//! under the absolute path of its `.nodb` file, as its workers see it
//! (`<weppcloud_root>/<run>/<name>.nodb`), 72 hours. The value is
//! WEPPcloud's re-encoding of the controller object with its `(mtime,
//! size)` signature, not the file's text, so runstate cannot write one:
//! it **deletes** the entry (`invalidate`, and first thing in every
//! release and break), and the next worker reads the file. Newer WEPPcloud
//! ignores an entry whose signature differs from the file's, and the file
//! store makes every rewrite change that signature.
//!
//! ## Status messages and milestones
//!
//! `publish` appends to runstate's own status stream (for `subscribe` and
//! its replay) and publishes the plain text on WEPPcloud's channel
//! `<run>:<topic>` (`<run>:climate`, …) in the same round trip. (Redis
//! pub/sub channels belong to the server, not to a database: WEPPcloud's
//! status clients select database 2, and its subscribers hear a message
//! published from any database.) Milestones and attributes are fields of
//! WEPPcloud's hash `<run>` in the lock database: `timestamps:<task>` as
//! whole epoch seconds (WEPPcloud reads them with `int()`), `attrs:<name>`
//! as given (WEPPcloud's own attributes are `true` / `false`).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redis::Script;
use runstate_core::events::{check_label, check_text};
use runstate_core::options::UrlOptions;
use runstate_core::time::{from_unix_millis, unix_millis};
use runstate_core::{
    Bytes, Capabilities, DocMeta, DocName, Error, ErrorKind, Fence, GetOptions, Lease, ListPage,
    Lock, LockInfo, LockKey, Milestones, Operation, Owner, PutOptions, Replay, Result, RunId,
    Store, StoredDoc, Subscription, Version, async_trait, check_ttl,
};
use sha2::Digest;

use crate::config::{DATABASE, config_error, database};
use crate::errors::unexpected;
use crate::reply::Reply;
use crate::scripts::MAX_TTL_MS;
use crate::{BACKEND, RedisConfig, RedisStore};

/// The URL option that turns a Redis URL into a WEPPcloud lock service.
pub const WEPPCLOUD_OPTION: &str = "weppcloud";

/// WEPPcloud's NoDb cache database (`RedisDB.NODB_CACHE`).
pub const DEFAULT_CACHE_DB: i64 = 13;

/// The prefix of WEPPcloud's NoDb lock keys (`LOCK_KEY_PREFIX`).
pub const LOCK_KEY_PREFIX: &str = "nodb-lock";

/// The name this lock service gives itself in capabilities.
pub const SERVICE: &str = "weppcloud";

/// Locks read per pipelined round trip when listing.
const HOLDER_BATCH: usize = 500;

/// Keys asked of each `SCAN` call when listing.
const SCAN_COUNT: usize = 1000;

/// Settings of a [`WeppcloudService`].
///
/// | URL option | default | meaning |
/// |---|---|---|
/// | `weppcloud` | | `true` (or `1`, `yes`, `on`): this URL is a WEPPcloud lock service (required) |
/// | `weppcloud_root` | the file store's root | the folder of the run folders *as WEPPcloud's workers see it* (`/wc1/runs/ab`, `/geodata/weppcloud_runs`): cache keys are `<root>/<run>/<name>.<ext>` |
/// | `weppcloud_cache_db` | 13 | WEPPcloud's NoDb cache database |
/// | `weppcloud_ext` | `nodb` | the controllers' file extension |
///
/// The URL's database (its path, `/0`) is WEPPcloud's lock database; every
/// other option is [`RedisConfig`]'s (`prefix` for runstate's own keys,
/// timeouts, …).
#[derive(Clone)]
pub struct WeppcloudConfig {
    redis: RedisConfig,
    root: Option<String>,
    cache_db: i64,
    ext: String,
}

impl WeppcloudConfig {
    /// WEPPcloud's locks in `redis`'s database, its cache in database 13,
    /// controllers named `<name>.nodb`; the root must still be given
    /// ([`with_root`](Self::with_root)).
    pub fn new(redis: RedisConfig) -> Self {
        WeppcloudConfig {
            redis,
            root: None,
            cache_db: DEFAULT_CACHE_DB,
            ext: "nodb".to_owned(),
        }
    }

    /// Whether `url` asks for a WEPPcloud lock service (`weppcloud=true`,
    /// or `1`, `yes`, `on`, as every true-or-false option reads). A URL
    /// whose options do not parse asks for nothing: opening it reports
    /// why.
    pub fn is_weppcloud_url(url: &str) -> bool {
        let query = url.split_once('?').map(|(_, query)| query);
        UrlOptions::parse(BACKEND, query)
            .and_then(|mut options| options.take_bool(WEPPCLOUD_OPTION))
            .is_ok_and(|on| on == Some(true))
    }

    /// Parses a `redis://…?weppcloud=true` URL (see the type's
    /// documentation for the options).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] without `weppcloud=true`, for a bad value (the
    /// option named, a password never shown), an option given twice or
    /// neither WEPPcloud's nor [`RedisConfig`]'s (the known ones listed),
    /// a `redis+cluster://` URL (WEPPcloud's locks and cache are in two
    /// databases, and a cluster has one), or anything
    /// [`RedisConfig::from_url`] refuses.
    pub fn from_url(url: &str) -> Result<Self> {
        let (mut on, mut root, mut cache_db, mut ext) = (None, None, None, None);
        // WEPPcloud's options are taken first; the Redis store's parser
        // takes its own and refuses what is left, naming both sets.
        let redis = RedisConfig::from_url_with(url, |options| {
            on = options.take_bool(WEPPCLOUD_OPTION)?;
            root = options.take("weppcloud_root");
            cache_db = options.take_with("weppcloud_cache_db", DATABASE, database)?;
            ext = options.take("weppcloud_ext");
            Ok(())
        })?;
        if on != Some(true) {
            return Err(config_error(
                "a WEPPcloud lock service needs weppcloud=true in its URL",
            ));
        }
        if !redis.cluster_nodes().is_empty() {
            return Err(config_error(
                "a WEPPcloud lock service needs a standalone Redis (its locks and its cache \
                 are in two databases), not a redis+cluster:// URL",
            ));
        }
        let mut config = WeppcloudConfig::new(redis);
        if let Some(db) = cache_db {
            config = config.with_cache_db(db);
        }
        if let Some(root) = root {
            config = config.with_root(root)?;
        }
        if let Some(ext) = ext {
            config = config.with_ext(ext)?;
        }
        Ok(config)
    }

    /// Sets the folder of the run folders as WEPPcloud's workers see it
    /// (cache keys are `<root>/<run>/<name>.<ext>`), normalised as
    /// WEPPcloud's `os.path.abspath` normalises its run folders (Python's
    /// `normpath`: `//`, `.` and `..` resolved by their text, a trailing
    /// `/` dropped), so the keys runstate deletes are the ones WEPPcloud
    /// wrote.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] unless it is an absolute path.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        let text = root.to_str().ok_or_else(|| {
            config_error(format!("weppcloud_root {} is not UTF-8", root.display()))
        })?;
        if !root.is_absolute() {
            return Err(config_error(format!(
                "weppcloud_root {text:?} must be an absolute path"
            )));
        }
        self.root = Some(normpath(text));
        Ok(self)
    }

    /// Sets WEPPcloud's NoDb cache database (13 by default).
    pub fn with_cache_db(mut self, db: i64) -> Self {
        self.cache_db = db;
        self
    }

    /// Sets the controllers' file extension (`nodb` by default).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] unless it is 1 to 16 ASCII letters and digits.
    pub fn with_ext(mut self, ext: impl Into<String>) -> Result<Self> {
        let ext = ext.into();
        if ext.is_empty() || ext.len() > 16 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(config_error(format!(
                "weppcloud_ext {ext:?} must be 1 to 16 ASCII letters or digits"
            )));
        }
        self.ext = ext;
        Ok(self)
    }

    /// The folder of the run folders as WEPPcloud sees it, once set.
    pub fn root(&self) -> Option<&str> {
        self.root.as_deref()
    }

    /// WEPPcloud's NoDb cache database.
    pub fn cache_db(&self) -> i64 {
        self.cache_db
    }

    /// The controllers' file extension.
    pub fn ext(&self) -> &str {
        &self.ext
    }

    /// The Redis connection settings (its database is WEPPcloud's lock
    /// database).
    pub fn redis(&self) -> &RedisConfig {
        &self.redis
    }
}

impl fmt::Debug for WeppcloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeppcloudConfig")
            .field("redis", &self.redis)
            .field("root", &self.root)
            .field("cache_db", &self.cache_db)
            .field("ext", &self.ext)
            .finish()
    }
}

/// Helpers of the scripts below; `HOME_DB`, `CACHE_DB` and `MAX_TTL_MS`
/// are filled in per service.
const PRELUDE: &str = r#"
local function ttl_arg(arg)
  local n = tonumber(arg)
  if not n or n ~= math.floor(n) or n < 1 or n > MAX_TTL_MS then return false end
  return n
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- max(counter + 1, server clock in µs), stored back (see the acquire
-- script of the Redis backend's `scripts`).
local function next_fence(key, now)
  local cur = redis.call('GET', key)
  local n = now
  if cur then
    local after = tonumber(cur) + 1
    if after > n then n = after end
  end
  local fence = string.format('%d', n)
  redis.call('SET', key, fence)
  return fence
end
-- A payload as a table, or nil (WEPPcloud's legacy payloads are a bare
-- token).
local function decode(v)
  local ok, t = pcall(cjson.decode, v)
  if ok and type(t) == 'table' then return t end
  return nil
end
-- WEPPcloud's _extract_token: the token field, else the raw payload.
local function token_of(v)
  local t = decode(v)
  if t and type(t.token) == 'string' then return t.token end
  return v
end
-- runstate's part of a payload of its own, or nil.
local function ours(t)
  if t and type(t.runstate) == 'table' and type(t.runstate.owner) == 'table' then return t.runstate end
  return nil
end
-- runstate's part, verbatim (its numbers never pass through Lua).
local function tail(v)
  local at = string.find(v, ',"runstate":', 1, true)
  if not at then return nil end
  return string.sub(v, at + 12, -2)
end
-- WEPPcloud's fields in its order and types, then runstate's.
local function payload(token, owner, acquired, expires, ttl_s, rs)
  return '{"token":"' .. token .. '","owner":' .. owner ..
    ',"acquired_at":' .. string.format('%d', acquired) ..
    ',"expires_at":' .. string.format('%d', expires) ..
    ',"ttl":' .. string.format('%d', ttl_s) .. ',"runstate":' .. rs .. '}'
end
local function drop_cache(key)
  if key == '' then return end
  redis.call('SELECT', CACHE_DB)
  redis.call('DEL', key)
  redis.call('SELECT', HOME_DB)
end
"#;

/// Takes a document lock. KEYS: lock, fence counter, run hash,
/// replacement guard. ARGV: new token, owner literal (`"host:pid"` as
/// JSON), runstate owner JSON, owner id, ttl ms, relpath.
/// Reply: ok, fence, since ms, token | locked, payload, pttl | replacing,
/// pttl | badttl.
const ACQUIRE: &str = r#"
local ttl = ttl_arg(ARGV[5])
if not ttl then return {'badttl'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'replacing', redis.call('PTTL', KEYS[4])} end
local ttl_s = math.ceil(ttl / 1000)
local now = now_us()
local now_s = math.floor(now / 1000000)
local v = redis.call('GET', KEYS[1])
if v then
  local t = decode(v)
  local rs = ours(t)
  local kept = tail(v)
  if not rs or rs.owner.id ~= ARGV[4] or not kept or type(t.token) ~= 'string' then
    return {'locked', v, redis.call('PTTL', KEYS[1])}
  end
  -- The owner's own live grant: handed back, its TTL restarted.
  local acquired = tonumber(t.acquired_at) or now_s
  redis.call('SET', KEYS[1], payload(t.token, ARGV[2], acquired, now_s + ttl_s, ttl_s, kept), 'XX', 'PX', ttl)
  redis.call('HSET', KEYS[3], 'locked:' .. ARGV[6], 'true')
  return {'ok', tostring(rs.fence), string.format('%d', tonumber(rs.since_ms) or 0), t.token}
end
local fence = next_fence(KEYS[2], now)
local since = string.format('%d', math.floor(now / 1000))
local rs = '{"fence":"' .. fence .. '","since_ms":' .. since .. ',"owner":' .. ARGV[3] .. '}'
redis.call('SET', KEYS[1], payload(ARGV[1], ARGV[2], now_s, now_s + ttl_s, ttl_s, rs), 'NX', 'PX', ttl)
redis.call('HSET', KEYS[3], 'locked:' .. ARGV[6], 'true')
return {'ok', fence, since, ARGV[1]}
"#;

/// Restarts a held lease's TTL, by token. KEYS: lock. ARGV: token, ttl
/// ms, owner literal. Reply: ok | lost[, payload, pttl] | badttl.
const RENEW: &str = r#"
local ttl = ttl_arg(ARGV[2])
if not ttl then return {'badttl'} end
local v = redis.call('GET', KEYS[1])
if not v then return {'lost'} end
local t = decode(v)
local kept = tail(v)
if token_of(v) ~= ARGV[1] or not ours(t) or not kept then
  return {'lost', v, redis.call('PTTL', KEYS[1])}
end
local ttl_s = math.ceil(ttl / 1000)
local now_s = math.floor(now_us() / 1000000)
local acquired = tonumber(t.acquired_at) or now_s
redis.call('SET', KEYS[1], payload(ARGV[1], ARGV[3], acquired, now_s + ttl_s, ttl_s, kept), 'XX', 'PX', ttl)
return {'ok'}
"#;

/// Gives a lease back: the cache entry first, then the key if it still
/// holds the token (compare-and-delete), then the mirror. KEYS: lock, run
/// hash, cache entry ('' for none). ARGV: token, relpath.
/// Reply: ok | lost[, payload, pttl].
const RELEASE: &str = r#"
drop_cache(KEYS[3])
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('HSET', KEYS[2], 'locked:' .. ARGV[2], 'false')
  return {'lost'}
end
if token_of(v) ~= ARGV[1] then return {'lost', v, redis.call('PTTL', KEYS[1])} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'locked:' .. ARGV[2], 'false')
return {'ok'}
"#;

/// An operator's forced release, whoever holds the lock. KEYS: lock, run
/// hash, cache entry. ARGV: only this fence ('' = any; WEPPcloud's own
/// locks have fence 0), relpath. Reply: ok, payload, pttl | free.
const BREAK: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {'free'} end
local rs = ours(decode(v))
local fence = '0'
if rs and rs.fence then fence = tostring(rs.fence) end
if ARGV[1] ~= '' and ARGV[1] ~= fence then return {'free'} end
local pttl = redis.call('PTTL', KEYS[1])
drop_cache(KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'locked:' .. ARGV[2], 'false')
return {'ok', v, pttl}
"#;

/// Who holds a lock key. KEYS: lock. Reply: ok, payload, pttl | free.
const INSPECT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {'free'} end
return {'ok', v, redis.call('PTTL', KEYS[1])}
"#;

/// Whether WEPPcloud (not runstate) holds a controller, or the run is
/// being replaced: what a write made without a document lease checks
/// first. KEYS: lock, replacement guard. Reply: free | foreign, payload,
/// pttl | replacing, pttl.
const FOREIGN: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return {'replacing', redis.call('PTTL', KEYS[2])} end
local v = redis.call('GET', KEYS[1])
if v and not ours(decode(v)) then return {'foreign', v, redis.call('PTTL', KEYS[1])} end
return {'free'}
"#;

/// Whether a lease still holds its key: WEPPcloud's own check before a
/// dump (`_assert_lock_owned_for_dump`), by token. KEYS: lock. ARGV:
/// token. Reply: ok | lost[, payload, pttl].
const HELD: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {'lost'} end
if token_of(v) ~= ARGV[1] then return {'lost', v, redis.call('PTTL', KEYS[1])} end
return {'ok'}
"#;

/// Deletes cache entries. KEYS: the entries. Reply: ok, how many.
const INVALIDATE: &str = r#"
redis.call('SELECT', CACHE_DB)
local n = 0
if #KEYS > 0 then n = redis.call('DEL', unpack(KEYS)) end
redis.call('SELECT', HOME_DB)
return {'ok', n}
"#;

/// Appends a status message to runstate's stream (the Redis backend's
/// script) and publishes its text on WEPPcloud's channel. KEYS: stream.
/// ARGV: as the Redis backend's status script, then WEPPcloud's channel.
const PUBLISH: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'topic', ARGV[2], 'text', ARGV[3], 'at', ARGV[4])
if ARGV[6] ~= '' then
  local t = redis.call('TIME')
  local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[6])
  if oldest > 0 then redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', oldest)) end
end
redis.call('PUBLISH', ARGV[1], id .. ' ' .. ARGV[4] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
redis.call('PUBLISH', ARGV[7], ARGV[3])
return {'ok', id}
"#;

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    break_lock: Script,
    inspect: Script,
    foreign: Script,
    held: Script,
    invalidate: Script,
    publish: Script,
}

impl Scripts {
    fn new(home_db: i64, cache_db: i64) -> Scripts {
        let settings = format!(
            "local HOME_DB = {home_db}\nlocal CACHE_DB = {cache_db}\nlocal MAX_TTL_MS = {MAX_TTL_MS}\n"
        );
        let script = |body: &str| Script::new(&format!("{settings}{PRELUDE}\n{body}"));
        Scripts {
            acquire: script(ACQUIRE),
            renew: script(RENEW),
            release: script(RELEASE),
            break_lock: script(BREAK),
            inspect: script(INSPECT),
            foreign: script(FOREIGN),
            held: script(HELD),
            invalidate: script(INVALIDATE),
            publish: script(PUBLISH),
        }
    }

    fn all(&self) -> [&Script; 9] {
        [
            &self.acquire,
            &self.renew,
            &self.release,
            &self.break_lock,
            &self.inspect,
            &self.foreign,
            &self.held,
            &self.invalidate,
            &self.publish,
        ]
    }
}

/// WEPPcloud's Redis as the lock service of a split store: document locks
/// that are WEPPcloud's NoDb locks, its cache kept coherent, status
/// messages on its channels and milestones in its run hash (see the
/// [module documentation](self)). Cheap to clone.
///
/// It holds no documents: every document operation is `Unsupported`.
#[derive(Clone)]
pub struct WeppcloudService {
    inner: Arc<Service>,
}

struct Service {
    /// runstate's own keys (run locks, fence counters, the status stream)
    /// in WEPPcloud's lock database, and the connection.
    store: RedisStore,
    config: WeppcloudConfig,
    root: String,
    scripts: Scripts,
    capabilities: Capabilities,
}

/// What a script's `locked`/`foreign`/`ok` reply says of a lock key.
fn holder_of(key: &LockKey, payload: &str, pttl: i64) -> LockInfo {
    #[derive(serde::Deserialize)]
    struct Ours {
        fence: String,
        #[serde(default)]
        since_ms: u64,
        owner: Owner,
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        runstate: Ours,
    }
    match serde_json::from_str::<Payload>(payload) {
        Ok(Payload { runstate }) => LockInfo::new(
            key.clone(),
            runstate.owner,
            Fence(runstate.fence.parse().unwrap_or(0)),
            from_unix_millis(runstate.since_ms),
            crate::reply::expires_in(pttl),
        ),
        Err(_) => crate::reply::weppcloud_info(key, payload, pttl),
    }
}

/// The holder shown while the run is being replaced.
fn replacing(key: &LockKey, pttl: i64, op: Operation) -> Error {
    let owner = Owner::new("weppcloud (run replacement)", 0, "run-replacement")
        .unwrap_or_else(|_| Owner::for_this_process());
    Error::new(
        ErrorKind::Locked,
        format!(
            "WEPPcloud is replacing run {} (its run-replacement guard is set); nothing was granted \
             or written",
            key.run()
        ),
    )
    .with_backend(BACKEND)
    .with_operation(op)
    .with_lock(key)
    .with_holder(LockInfo::new(
        key.clone(),
        owner,
        Fence(0),
        SystemTime::now(),
        crate::reply::expires_in(pttl),
    ))
}

fn locked(key: &LockKey, holder: LockInfo, op: Operation) -> Error {
    let message = if holder.fence == Fence(0) {
        "the lock is held by WEPPcloud (its NoDb lock key exists)"
    } else {
        "the lock is held"
    };
    Error::new(ErrorKind::Locked, message)
        .with_backend(BACKEND)
        .with_operation(op)
        .with_lock(key)
        .with_holder(holder)
}

fn unsupported(op: Operation) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "the WEPPcloud lock service holds no documents: use it as the lock service (locks=…) of \
         a file store of WEPPcloud run folders",
    )
    .with_backend(BACKEND)
    .with_operation(op)
}

/// The run-replacement guard of `run`: `nodb:run-replacement:<sha256("run\0"
/// + run)>`.
fn replacement_key(run: &RunId) -> String {
    format!(
        "nodb:run-replacement:{}",
        sha256_hex(&format!("run\0{run}"))
    )
}

/// The SHA-256 of `text` as 64 lowercase hex digits (Python's
/// `hashlib.sha256(text).hexdigest()`).
pub(crate) fn sha256_hex(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random UUID4 as 32 lowercase hex digits (`uuid.uuid4().hex`).
fn new_token() -> String {
    let mut bits = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
    bits = (bits & !(0xf_u128 << 76)) | (0x4_u128 << 76);
    bits = (bits & !(0x3_u128 << 62)) | (0x2_u128 << 62);
    format!("{bits:032x}")
}

impl WeppcloudService {
    /// Connects (see [`RedisStore::open`]) and loads the scripts.
    ///
    /// # Errors
    /// `Config` without a root ([`WeppcloudConfig::with_root`]); as
    /// [`RedisStore::open`] otherwise.
    pub async fn open(config: WeppcloudConfig) -> Result<WeppcloudService> {
        let root = config
            .root
            .clone()
            .ok_or_else(|| {
                config_error(
                    "a WEPPcloud lock service needs weppcloud_root, the folder of the run folders \
                     as WEPPcloud sees it (the runstate facade sets it to the file store's root)",
                )
            })
            .map_err(|e| e.with_operation(Operation::Open))?;
        let store = RedisStore::open(config.redis.clone()).await?;
        let scripts = Scripts::new(config.redis.db, config.cache_db);
        let mut con = store.inner.conn.clone();
        for script in scripts.all() {
            store
                .inner
                .bounded(script.load_async(&mut con))
                .await
                .map_err(|e| e.with_operation(Operation::Open))?;
        }
        Ok(WeppcloudService {
            inner: Arc::new(Service {
                store,
                root,
                config,
                scripts,
                capabilities: Capabilities::full(SERVICE)
                    .with_conditional_put(false)
                    .with_conditional_delete(false)
                    .with_leases(true)
                    .with_multi_host(true)
                    .with_status(true)
                    .with_milestones(true),
            }),
        })
    }

    /// Parses `url` ([`WeppcloudConfig::from_url`]) and opens the service.
    ///
    /// # Errors
    /// As [`WeppcloudConfig::from_url`] and [`WeppcloudService::open`].
    pub async fn connect(url: &str) -> Result<WeppcloudService> {
        Self::open(WeppcloudConfig::from_url(url)?).await
    }

    /// The settings.
    pub fn config(&self) -> &WeppcloudConfig {
        &self.inner.config
    }

    /// WEPPcloud's cache key of a controller: `<root>/<run>/<name>.<ext>`.
    pub fn cache_key(&self, run: &RunId, doc: &DocName) -> String {
        let root = if self.inner.root == "/" {
            ""
        } else {
            &self.inner.root
        };
        format!("{root}/{run}/{doc}.{}", self.inner.config.ext)
    }

    /// WEPPcloud's lock key of a controller: `nodb-lock:<run>:<name>.<ext>`.
    pub fn lock_key(&self, run: &RunId, doc: &DocName) -> String {
        format!("{LOCK_KEY_PREFIX}:{run}:{}", self.relpath(doc))
    }

    fn relpath(&self, doc: &DocName) -> String {
        format!("{doc}.{}", self.inner.config.ext)
    }

    /// Deletes WEPPcloud's cached copies of `docs` (database 13), so the
    /// next worker reads the files. One round trip.
    ///
    /// # Errors
    /// Connection errors and timeouts.
    pub async fn invalidate(&self, run: &RunId, docs: &[DocName]) -> Result<()> {
        let mut invocation = self.inner.scripts.invalidate.prepare_invoke();
        for doc in docs {
            invocation.key(self.cache_key(run, doc));
        }
        let reply = self
            .inner
            .store
            .inner
            .invoke(&invocation)
            .await
            .map_err(|e| e.with_run(run))?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Fails with `Locked` when WEPPcloud (not runstate) holds `doc`'s
    /// lock, or is replacing the run: what a write made without that
    /// document's lease checks first. A runstate lease on it does not
    /// count (its holder's saves are fenced and version-checked).
    ///
    /// # Errors
    /// `Locked` with WEPPcloud's holder; connection errors and timeouts.
    pub async fn check_not_held_by_weppcloud(
        &self,
        run: &RunId,
        doc: &DocName,
        op: Operation,
    ) -> Result<()> {
        let key = LockKey::Doc(run.clone(), doc.clone());
        let mut invocation = self.inner.scripts.foreign.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .key(replacement_key(run));
        let mut reply = self.inner.store.inner.invoke(&invocation).await?;
        match reply.status.as_str() {
            "free" => Ok(()),
            "foreign" => {
                let payload = reply.text()?;
                let pttl = reply.int()?;
                Err(locked(&key, holder_of(&key, &payload, pttl), op))
            }
            "replacing" => Err(replacing(&key, reply.int()?, op)),
            other => Err(unexpected(other)),
        }
    }

    /// Fails with `LeaseLost` unless the document lease `lease` still holds
    /// WEPPcloud's key (its token is there): what WEPPcloud checks before
    /// every dump, since an operator's `clear_locks` (or the key's expiry)
    /// may have ended it before the holder's local deadline. A run lease
    /// passes (it is runstate's own, fenced by the document store).
    ///
    /// # Errors
    /// `LeaseLost`, with the new holder when there is one; connection
    /// errors and timeouts.
    pub async fn check_held(&self, lease: &Lease, op: Operation) -> Result<()> {
        let key = lease.key();
        let LockKey::Doc(run, doc) = key else {
            return Ok(());
        };
        let mut invocation = self.inner.scripts.held.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .arg(lease.token().unwrap_or(""));
        let outcome = async {
            let mut reply = self.inner.store.inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => Ok(()),
                "lost" => Err(Self::lost(key, &mut reply, op)?),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(op).with_lock(key))
    }

    async fn acquire_doc(
        &self,
        key: &LockKey,
        run: &RunId,
        doc: &DocName,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Lease> {
        let op = Operation::Acquire;
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND).with_operation(op).with_lock(key))?;
        let ttl_ms = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
        let owner_literal = serde_json::to_string(&format!("{}:{}", owner.host(), owner.pid()))
            .map_err(|e| {
                Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
            })?;
        let owner_json = serde_json::to_string(owner).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
        })?;
        let mut invocation = self.inner.scripts.acquire.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .key(self.inner.store.inner.keys.fence(key))
            .key(run.as_str())
            .key(replacement_key(run));
        invocation
            .arg(new_token())
            .arg(owner_literal)
            .arg(owner_json)
            .arg(owner.id())
            .arg(ttl_ms.to_string())
            .arg(self.relpath(doc));
        let issued = Instant::now();
        let mut reply = self.inner.store.inner.invoke(&invocation).await?;
        match reply.status.as_str() {
            "ok" => {
                let fence: u64 = reply.text()?.parse().map_err(|_| unexpected("fence"))?;
                let since: u64 = reply.text()?.parse().map_err(|_| unexpected("since"))?;
                let token = reply.text()?;
                Ok(Lease::new(
                    key.clone(),
                    owner.clone(),
                    Fence(fence),
                    ttl,
                    issued,
                    from_unix_millis(since),
                )
                .with_token(token))
            }
            "locked" => {
                let payload = reply.text()?;
                let pttl = reply.int()?;
                Err(locked(key, holder_of(key, &payload, pttl), op))
            }
            "replacing" => Err(replacing(key, reply.int()?, op)),
            "badttl" => Err(Error::new(
                ErrorKind::InvalidArgument,
                "redis refused the lease TTL; nothing was written",
            )
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(key)),
            other => Err(unexpected(other)),
        }
    }

    /// The `lost` reply of a renewal or release.
    fn lost(key: &LockKey, reply: &mut Reply, op: Operation) -> Result<Error> {
        let holder = if reply.has_more() {
            let payload = reply.text()?;
            let pttl = reply.int()?;
            Some(holder_of(key, &payload, pttl))
        } else {
            None
        };
        let why = match &holder {
            Some(h) if h.fence == Fence(0) => "WEPPcloud holds the lock now",
            Some(_) => "the lock was taken over by a newer grant",
            None => "the lease expired, was released or was broken (WEPPcloud's clear_locks?)",
        };
        Ok(Error::lease_lost_because(key, why, holder)
            .with_backend(BACKEND)
            .with_operation(op))
    }

    /// Every document lock under `pattern` (`nodb-lock:<run>:*` or
    /// `nodb-lock:*`), read in pipelined batches; keys that name no
    /// runstate run and document are skipped.
    async fn scan_doc_locks(&self, pattern: &str) -> Result<Vec<LockInfo>> {
        let inner = &self.inner.store.inner;
        let mut con = inner.conn.clone();
        let mut keys: Vec<(String, LockKey)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = inner
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut con),
                )
                .await?;
            for name in batch {
                if !seen.insert(name.clone()) {
                    continue;
                }
                match self.parse_lock_key(&name) {
                    Some(key) => keys.push((name, key)),
                    None => tracing::debug!(
                        key = %name,
                        "a WEPPcloud lock runstate cannot name (a batch or child run, a folder lock) is not listed"
                    ),
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut locks = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(HOLDER_BATCH) {
            let mut pipe = redis::pipe();
            for (name, _) in chunk {
                let mut invocation = self.inner.scripts.inspect.prepare_invoke();
                invocation.key(name);
                pipe.invoke_script(&invocation);
            }
            let replies = inner
                .transact(&pipe, &self.inner.scripts.inspect, None)
                .await?;
            if replies.len() != chunk.len() {
                return Err(unexpected("pipelined replies"));
            }
            for ((_, key), value) in chunk.iter().zip(replies) {
                let mut reply = Reply::parse(value)?;
                match reply.status.as_str() {
                    "ok" => {
                        let payload = reply.text()?;
                        let pttl = reply.int()?;
                        locks.push(holder_of(key, &payload, pttl));
                    }
                    "free" => {}
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok(locks)
    }

    /// The document lock a WEPPcloud lock key names, when runstate can
    /// name it: `nodb-lock:<run>:<name>.<ext>` with a valid run id and
    /// document name (not `batch;;…;;<run>`, not `_pups/…`, not
    /// `runtime-paths/…`).
    fn parse_lock_key(&self, key: &str) -> Option<LockKey> {
        let rest = key.strip_prefix(LOCK_KEY_PREFIX)?.strip_prefix(':')?;
        let (run, relpath) = rest.split_once(':')?;
        let name = relpath.strip_suffix(&format!(".{}", self.inner.config.ext))?;
        Some(LockKey::Doc(
            RunId::new(run).ok()?,
            DocName::new(name).ok()?,
        ))
    }

    fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    async fn check_replacement(&self, key: &LockKey, op: Operation) -> Result<()> {
        let inner = &self.inner.store.inner;
        let mut con = inner.conn.clone();
        let pttl: i64 = inner
            .bounded(
                redis::cmd("PTTL")
                    .arg(replacement_key(key.run()))
                    .query_async(&mut con),
            )
            .await?;
        // -2: no such key.
        if pttl == -2 {
            Ok(())
        } else {
            Err(replacing(key, pttl, op))
        }
    }
}

impl fmt::Debug for WeppcloudService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeppcloudService")
            .field("config", &self.inner.config)
            .finish()
    }
}

#[async_trait]
impl Store for WeppcloudService {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn get(
        &self,
        _run: &RunId,
        _doc: &DocName,
        _options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        Err(unsupported(Operation::Get))
    }

    async fn put(
        &self,
        _run: &RunId,
        _doc: &DocName,
        _bytes: Bytes,
        _options: PutOptions<'_>,
    ) -> Result<Version> {
        Err(unsupported(Operation::Put))
    }

    async fn delete(
        &self,
        _run: &RunId,
        _doc: &DocName,
        _if_version: Option<&Version>,
    ) -> Result<bool> {
        Err(unsupported(Operation::Delete))
    }

    async fn list_docs(
        &self,
        _run: &RunId,
        _after: Option<&DocName>,
        _limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        Err(unsupported(Operation::ListDocs))
    }

    async fn list_runs(&self, _after: Option<&RunId>, _limit: usize) -> Result<ListPage<RunId>> {
        Err(unsupported(Operation::ListRuns))
    }

    /// Keeps no documents (0), but forgets what it keeps of the run, as a
    /// store deletes a run's milestones with its documents: one script
    /// deletes the milestone fields of WEPPcloud's run hash
    /// (`timestamps:*`, `attrs:*`, which WEPPcloud and runstate share;
    /// every other field stays) and runstate's status stream of the run.
    /// The WEPPcloud store asks it only for a run it had documents of.
    ///
    /// `attrs:loaded` stays: it is WEPPcloud's mark that the hash was
    /// filled from the run folder's `redisprep.dump` (which the file store
    /// keeps: it is no controller), and without it WEPPcloud's next
    /// request would load every deleted field back from that file.
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        let inner = &self.inner.store.inner;
        let script = redis::Script::new(
            "for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do \
               if f ~= 'attrs:loaded' and (string.sub(f, 1, 11) == 'timestamps:' \
                 or string.sub(f, 1, 6) == 'attrs:') then \
                 redis.call('HDEL', KEYS[1], f) end end \
             redis.call('DEL', KEYS[2]) return 0",
        );
        let mut invocation = script.prepare_invoke();
        invocation.key(run.as_str()).key(inner.keys.status(run));
        let mut con = inner.conn.clone();
        let _: i64 = inner
            .bounded(invocation.invoke_async(&mut con))
            .await
            .map_err(|e| e.with_backend(BACKEND).at_run(Operation::DeleteRun, run))?;
        Ok(0)
    }

    /// One script: the message appended to runstate's stream (what
    /// `subscribe` replays) and published, as plain text, on WEPPcloud's
    /// channel `<run>:<topic>`.
    async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<()> {
        let inner = &self.inner.store.inner;
        let op = Operation::Publish;
        let context = |e: Error| e.with_backend(BACKEND).at_run(op, run);
        check_label("topic", topic).map_err(context)?;
        check_text("status message", text).map_err(context)?;
        let mut invocation = self.inner.scripts.publish.prepare_invoke();
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
            )
            .arg(format!("{run}:{topic}"));
        let reply = inner.invoke(&invocation).await.map_err(context)?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            other => Err(context(unexpected(other))),
        }
    }

    async fn subscribe(&self, run: &RunId, replay: Replay) -> Result<Subscription> {
        self.store().subscribe(run, replay).await
    }

    /// `HSET <run> timestamps:<task> <whole epoch seconds>` in WEPPcloud's
    /// run hash (WEPPcloud reads it with `int()`; a fraction is dropped).
    async fn mark(&self, run: &RunId, task: &str, at: SystemTime) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::Mark, run);
        check_label("task", task).map_err(context)?;
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| {
                context(Error::new(
                    ErrorKind::InvalidArgument,
                    "a milestone cannot be dated before 1970",
                ))
            })?
            .as_secs();
        self.hset(run, &format!("timestamps:{task}"), &secs.to_string())
            .await
            .map_err(context)
    }

    /// `HSET <run> attrs:<name> <value>` in WEPPcloud's run hash.
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        let context = |e: Error| e.with_backend(BACKEND).at_run(Operation::SetAttr, run);
        check_label("attribute", name).map_err(context)?;
        check_text("attribute value", value).map_err(context)?;
        self.hset(run, &format!("attrs:{name}"), value)
            .await
            .map_err(context)
    }

    /// The `timestamps:*` and `attrs:*` fields of WEPPcloud's run hash
    /// (its `locked:*`, `rq:*` and other fields are left out).
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let inner = &self.inner.store.inner;
        let mut con = inner.conn.clone();
        let fields: Vec<(String, String)> = inner
            .bounded(
                redis::cmd("HGETALL")
                    .arg(run.as_str())
                    .query_async(&mut con),
            )
            .await
            .map_err(|e| e.at_run(Operation::Milestones, run))?;
        Ok(crate::status::milestones_of(fields))
    }
}

impl WeppcloudService {
    async fn hset(&self, run: &RunId, field: &str, value: &str) -> Result<()> {
        let inner = &self.inner.store.inner;
        let mut con = inner.conn.clone();
        let _: i64 = inner
            .bounded(
                redis::cmd("HSET")
                    .arg(run.as_str())
                    .arg(field)
                    .arg(value)
                    .query_async(&mut con),
            )
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Lock for WeppcloudService {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        match key {
            LockKey::Doc(run, doc) => self
                .acquire_doc(key, run, doc, owner, ttl)
                .await
                .map_err(|e| e.with_operation(Operation::Acquire).with_lock(key)),
            LockKey::Run(_) => {
                check_ttl(ttl).map_err(|e| {
                    e.with_backend(BACKEND)
                        .with_operation(Operation::Acquire)
                        .with_lock(key)
                })?;
                self.check_replacement(key, Operation::Acquire).await?;
                self.store().try_acquire(key, owner, ttl).await
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let key = lease.key();
        let op = Operation::Renew;
        let LockKey::Doc(_, _) = key else {
            return self.store().renew(lease, ttl).await;
        };
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND).with_operation(op).with_lock(key))?;
        let ttl_ms = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
        let owner = lease.owner();
        let owner_literal = serde_json::to_string(&format!("{}:{}", owner.host(), owner.pid()))
            .map_err(|e| {
                Error::new(ErrorKind::InvalidArgument, "owner cannot be encoded").with_source(e)
            })?;
        let (run, doc) = (key.run(), key.doc().ok_or_else(|| unexpected("doc"))?);
        let mut invocation = self.inner.scripts.renew.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .arg(lease.token().unwrap_or(""))
            .arg(ttl_ms.to_string())
            .arg(owner_literal);
        let issued = Instant::now();
        let outcome = async {
            let mut reply = self.inner.store.inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => Ok(lease.renewed(ttl, issued)),
                "lost" => Err(Self::lost(key, &mut reply, op)?),
                "badttl" => Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "redis refused the lease TTL; nothing was written",
                )
                .with_backend(BACKEND)),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(op).with_lock(key))
    }

    /// For a document lock: deletes WEPPcloud's cached copy of the
    /// controller, then the lock key if it still holds this lease's token,
    /// in one script.
    async fn release(&self, lease: &Lease) -> Result<()> {
        let key = lease.key();
        let op = Operation::Release;
        let LockKey::Doc(run, doc) = key else {
            return self.store().release(lease).await;
        };
        let mut invocation = self.inner.scripts.release.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .key(run.as_str())
            .key(self.cache_key(run, doc))
            .arg(lease.token().unwrap_or(""))
            .arg(self.relpath(doc));
        let outcome = async {
            let mut reply = self.inner.store.inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => Ok(()),
                "lost" => Err(Self::lost(key, &mut reply, op)?),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(op).with_lock(key))
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let LockKey::Doc(run, doc) = key else {
            return self.store().inspect(key).await;
        };
        let mut invocation = self.inner.scripts.inspect.prepare_invoke();
        invocation.key(self.lock_key(run, doc));
        let outcome = async {
            let mut reply = self.inner.store.inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => {
                    let payload = reply.text()?;
                    let pttl = reply.int()?;
                    Ok(Some(holder_of(key, &payload, pttl)))
                }
                "free" => Ok(None),
                other => Err(unexpected(other)),
            }
        };
        outcome
            .await
            .map_err(|e: Error| e.with_operation(Operation::Inspect).with_lock(key))
    }

    /// For a document lock: deletes the key whoever holds it (runstate or
    /// WEPPcloud, whose locks have fence 0), with the cached copy, as
    /// WEPPcloud's `clear_locks` does; logged.
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        let LockKey::Doc(run, doc) = key else {
            return self.store().break_lock(key, only_fence).await;
        };
        let mut invocation = self.inner.scripts.break_lock.prepare_invoke();
        invocation
            .key(self.lock_key(run, doc))
            .key(run.as_str())
            .key(self.cache_key(run, doc))
            .arg(only_fence.map_or_else(String::new, |f| f.to_string()))
            .arg(self.relpath(doc));
        let outcome = async {
            let mut reply = self.inner.store.inner.invoke(&invocation).await?;
            match reply.status.as_str() {
                "ok" => {
                    let payload = reply.text()?;
                    let pttl = reply.int()?;
                    let broken = holder_of(key, &payload, pttl);
                    tracing::warn!(
                        lock = %key,
                        redis_key = %self.lock_key(run, doc),
                        holder = %broken.owner,
                        fence = %broken.fence,
                        by = %format!("{}:{}", runstate_core::process::hostname(), std::process::id()),
                        "WEPPcloud NoDb lock broken"
                    );
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

    /// WEPPcloud's NoDb locks of the run (or of every run) that runstate
    /// can name, whoever holds them, and runstate's run locks.
    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        let pattern = match run {
            Some(run) => format!("{LOCK_KEY_PREFIX}:{run}:*"),
            None => format!("{LOCK_KEY_PREFIX}:*"),
        };
        let context = |e: Error| {
            let e = e.with_operation(Operation::ListLocks);
            match run {
                Some(run) => e.with_run(run),
                None => e,
            }
        };
        let mut locks = self.scan_doc_locks(&pattern).await.map_err(context)?;
        locks.extend(
            self.store()
                .list_locks(run)
                .await?
                .into_iter()
                .filter(|l| matches!(l.key, LockKey::Run(_))),
        );
        locks.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(locks)
    }

    /// Run locks are followed through runstate's announcements; document
    /// locks announce nothing WEPPcloud would hear or send, so their
    /// waiters back off (bounded by `max`).
    async fn wait_for_release(&self, key: &LockKey, max: Duration) {
        match key {
            LockKey::Run(_) => self.store().wait_for_release(key, max).await,
            LockKey::Doc(_, _) => tokio::time::sleep(max).await,
        }
    }
}

/// An absolute path normalised by its text, as Python's
/// `posixpath.normpath`: repeated `/` collapse (but exactly two leading
/// ones stay, as POSIX allows them a meaning), `.` goes, `..` removes the
/// component before it (none above the root), no trailing `/`.
fn normpath(path: &str) -> String {
    let lead = if path.starts_with("//") && !path.starts_with("///") {
        "//"
    } else {
        "/"
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("{lead}{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cache keys start with the root as WEPPcloud's `os.path.abspath`
    /// writes it. (Only a trailing `/` was dropped: a root given with
    /// `//`, `.` or `..` made every cache deletion miss its key.)
    #[test]
    fn roots_are_normalised_as_weppcloud_does() {
        for (given, normal) in [
            ("/wc1/runs/ab", "/wc1/runs/ab"),
            ("/wc1/runs/ab/", "/wc1/runs/ab"),
            ("/wc1//runs/./ab", "/wc1/runs/ab"),
            ("/wc1/runs/x/../ab", "/wc1/runs/ab"),
            ("/../wc1", "/wc1"),
            ("///wc1", "/wc1"),
            ("//wc1", "//wc1"),
            ("/", "/"),
            ("/..", "/"),
        ] {
            let config = WeppcloudConfig::from_url("redis://127.0.0.1:6390/0?weppcloud=true")
                .expect("url")
                .with_root(given)
                .expect("absolute");
            assert_eq!(config.root(), Some(normal), "{given}");
        }
    }

    #[test]
    fn tokens_are_uuid4_hex() {
        for _ in 0..100 {
            let token = new_token();
            assert_eq!(token.len(), 32);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(&token[12..13], "4", "{token}");
            assert!(matches!(&token[16..17], "8" | "9" | "a" | "b"), "{token}");
        }
    }

    #[test]
    fn replacement_keys_are_weppclouds() {
        // sha256(b"run\0Mica_flume1"), as Python's hashlib computes it.
        let key = replacement_key(&RunId::new("Mica_flume1").expect("valid"));
        assert!(key.starts_with("nodb:run-replacement:"));
        assert_eq!(key.len(), "nodb:run-replacement:".len() + 64);
    }

    #[test]
    fn urls_are_parsed_and_checked() {
        let config = WeppcloudConfig::from_url(
            "redis://127.0.0.1:6390/0?weppcloud=true&weppcloud_root=/wc1/runs/ab/&prefix=rs&weppcloud_cache_db=12",
        )
        .expect("valid");
        assert_eq!(config.root(), Some("/wc1/runs/ab"));
        assert_eq!(config.cache_db(), 12);
        assert_eq!(config.redis().prefix(), "rs");
        assert_eq!(config.redis().db(), 0);
        assert!(WeppcloudConfig::is_weppcloud_url(
            "redis://h/0?prefix=a&weppcloud=true"
        ));
        assert!(!WeppcloudConfig::is_weppcloud_url("redis://h/0?prefix=a"));
        for bad in [
            "redis://h/0",
            "redis://h/0?weppcloud=maybe",
            "redis://h/0?weppcloud=true&weppcloud_root=relative",
            "redis://h/0?weppcloud=true&weppcloud_cache_db=-1",
            "redis://h/0?weppcloud=true&weppcloud_ext=no.dots",
            "redis://h/0?weppcloud=true&bogus=1",
        ] {
            let error = WeppcloudConfig::from_url(bad).expect_err(bad);
            assert_eq!(error.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn options_are_checked_by_name_and_never_show_a_password() {
        const SENTINEL: &str = "s3ntinel-PASSWORD-9f8e";
        let url = format!("redis://:{SENTINEL}@h/0?weppcloud=true&colour={SENTINEL}");
        let error = WeppcloudConfig::from_url(&url).expect_err("unknown option");
        assert_eq!(error.kind(), ErrorKind::Config);
        let shown = format!("{} {error:?}", runstate_core::display_chain(&error));
        assert!(!shown.contains(SENTINEL), "{shown}");
        assert!(
            shown.contains(
                "unknown redis URL option \"colour\" (known: weppcloud, weppcloud_root, \
                 weppcloud_cache_db, weppcloud_ext, prefix, timeout_ms,"
            ),
            "{shown}"
        );
        for (query, needle) in [
            (
                "weppcloud=true&weppcloud=true",
                "\"weppcloud\" is given twice",
            ),
            (
                "weppcloud=true&weppcloud_root=/a&weppcloud_root=/b",
                "\"weppcloud_root\" is given twice",
            ),
            (
                "weppcloud=true&weppcloud_cache_db=x",
                "option weppcloud_cache_db must be a database number ≥ 0, got \"x\"",
            ),
            (
                "weppcloud=maybe",
                "option weppcloud must be true or false, got \"maybe\"",
            ),
            ("weppcloud=false", "needs weppcloud=true"),
            ("prefix=a", "needs weppcloud=true"),
            (
                "weppcloud=true&timeout_ms=0",
                "option timeout_ms must be a number of milliseconds from 1",
            ),
        ] {
            let url = format!("redis://admin:{SENTINEL}@h/0?{query}");
            let error = WeppcloudConfig::from_url(&url).expect_err(query);
            assert_eq!(error.kind(), ErrorKind::Config, "{query}");
            let shown = format!("{} {error:?}", runstate_core::display_chain(&error));
            assert!(shown.contains(needle), "{query}: {shown}");
            assert!(!shown.contains(SENTINEL), "{query}: {shown}");
        }
        // Read as every true-or-false option is, and as the runstate
        // facade reads it when it picks the WEPPcloud composition.
        for on in ["true", "1", "yes", "ON"] {
            let url = format!("redis://h/0?weppcloud={on}");
            assert!(WeppcloudConfig::is_weppcloud_url(&url), "{url}");
            assert!(WeppcloudConfig::from_url(&url).is_ok(), "{url}");
        }
        for off in [
            "redis://h/0?weppcloud=false",
            "redis://h/0?weppcloud=maybe",
            "redis://h/0?weppcloud=true&weppcloud=true",
            "redis://h/0?weppcloud_root=/r",
        ] {
            assert!(!WeppcloudConfig::is_weppcloud_url(off), "{off}");
        }
        // Defaults, and %-encoded values decoded.
        let config =
            WeppcloudConfig::from_url("redis://h/3?weppcloud=true&weppcloud_root=%2Fwc1%2Fr%20s")
                .expect("valid");
        assert_eq!(
            (
                config.root(),
                config.cache_db(),
                config.ext(),
                config.redis().db()
            ),
            (Some("/wc1/r s"), DEFAULT_CACHE_DB, "nodb", 3)
        );
    }

    #[test]
    fn a_cluster_is_refused() {
        for url in [
            "redis+cluster://h1:7000,h2:7001/?weppcloud=true",
            "redis+cluster://:pw@h1:7000?weppcloud=true",
        ] {
            let error = WeppcloudConfig::from_url(url).expect_err(url);
            assert_eq!(error.kind(), ErrorKind::Config, "{url}");
            assert!(error.to_string().contains("standalone Redis"), "{error}");
        }
    }

    #[test]
    fn holders_are_read_from_either_kind_of_payload() {
        let key = LockKey::Doc(
            RunId::new("r").expect("valid"),
            DocName::new("climate").expect("valid"),
        );
        let wepp = holder_of(
            &key,
            r#"{"token":"0f3a","owner":"wepp1:42","acquired_at":1700000000,"expires_at":1700021600,"ttl":21600}"#,
            3000,
        );
        assert_eq!(
            (wepp.owner.host(), wepp.owner.pid(), wepp.fence),
            ("wepp1", 42, Fence(0))
        );
        let owner = Owner::new("h", 7, "abc").expect("valid");
        let ours = holder_of(
            &key,
            &format!(
                r#"{{"token":"0f3a","owner":"h:7","acquired_at":1,"expires_at":2,"ttl":1,"runstate":{{"fence":"18446744073709551000","since_ms":1700000000123,"owner":{}}}}}"#,
                serde_json::to_string(&owner).expect("json")
            ),
            3000,
        );
        assert_eq!(ours.owner, owner);
        assert_eq!(ours.fence, Fence(18_446_744_073_709_551_000));
        assert_eq!(ours.since, from_unix_millis(1_700_000_000_123));
    }
}
