//! The server-side scripts: each operation is one `EVALSHA` (loaded once,
//! reloaded transparently after `NOSCRIPT` by the redis crate), so every
//! check is atomic with its write and costs one round trip.
//!
//! Replies are arrays whose first element says what happened: `ok`,
//! `exists`, `precondition`, `fenced`, `locked`, `lost`, `foreign` (a
//! WEPPcloud lock), `toolarge`, `absent`, `free`.
//!
//! The common paths are kept to as few server calls as possible (a locked
//! update is 4 calls to acquire, a pipelined HMGET to load, and 4 calls to
//! save-and-release), since
//! every call counts against the benchmark's raw `GET`/`SET` baseline.

use redis::Script;

use crate::config::WeppcloudLocks;

/// Helpers shared by the scripts. `WEPP*` are filled in per store.
///
/// Numbers above 2^47 go through `string.format('%d')`: Redis turns a Lua
/// number into a string with 14 significant digits, which would mangle a
/// 16-digit counter.
const PRELUDE: &str = r#"
local function counter(key)
  local n = redis.call('INCR', key)
  if n == 1 then
    local t = redis.call('TIME')
    local seeded = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', key, seeded)
    return seeded, true
  end
  return string.format('%d', n), false
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A grant stores its TTL; until a renewal pins it, 'since' is derived as
-- now - (ttl - pttl), which keeps TIME off the acquire path.
local function since_of(h, pttl)
  if h[3] then return h[3] end
  return string.format('%d', now_ms() - (tonumber(h[4]) - pttl))
end
local function holder(lock)
  local h = redis.call('HMGET', lock, 'owner', 'fence', 'since', 'ttl')
  if not h[1] then return false end
  local pttl = redis.call('PTTL', lock)
  return {h[1], h[2], since_of(h, pttl), pttl}
end
local function foreign_any(run, names)
  if not WEPP then return false end
  for _, n in ipairs(names) do
    local key = 'nodb-lock:' .. run .. ':' .. n .. WEPP_EXT
    if WEPP_DB ~= WEPP_HOME then redis.call('SELECT', WEPP_DB) end
    local v = redis.call('GET', key)
    local ttl = redis.call('PTTL', key)
    if WEPP_DB ~= WEPP_HOME then redis.call('SELECT', WEPP_HOME) end
    if v then return {'foreign', v, ttl, n} end
  end
  return false
end
local function check_mode(doc, mode, expected)
  if mode == 'o' then return false end
  local cur = redis.call('HGET', doc, 'version')
  if mode == 'c' and cur then return {'exists'} end
  if mode == 'u' and cur ~= expected then return {'precondition'} end
  return false
end
local function place(staging, doc, docs, runs, name, run, mode)
  redis.call('RENAME', staging, doc)
  -- A run is in the runs index exactly while its index is not empty; an
  -- update found the document, so it is indexed already.
  if mode ~= 'u' and redis.call('ZADD', docs, 0, name) == 1 then redis.call('ZADD', runs, 0, run) end
  return {'ok'}
end
"#;

// The bytes of a write never pass through Lua (copying a 4 KiB argument
// into the interpreter costs more than the whole write): the client stages
// the new document with `HSET <staging> version <v> data <bytes>` and the
// script, in the same MULTI/EXEC, checks and then RENAMEs the staging hash
// over the document, or deletes it when the write is refused. Versions are
// random 128-bit tokens made by the client, so no counter call is needed.
// An unconditional, unfenced write needs no check at all and skips Lua
// (see `Inner::put`).

/// Conditional (or, with WEPPcloud locks, any) unfenced put.
/// KEYS: doc, docs index, runs index, staging.
/// ARGV: name, run, mode (o|c|u), expected version.
const PUT: &str = r#"
local refusal = foreign_any(ARGV[2], {ARGV[1]}) or check_mode(KEYS[1], ARGV[3], ARGV[4])
if refusal then
  redis.call('DEL', KEYS[4])
  return refusal
end
return place(KEYS[4], KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"#;

/// Fenced put, optionally releasing the lease (save-and-release).
/// KEYS: doc, docs index, runs index, staging, lock.
/// ARGV: name, run, mode (o|c|u), expected version, lease oid, lease fence,
/// release (0|1).
const SAVE: &str = r#"
local h = redis.call('HMGET', KEYS[5], 'oid', 'fence')
if h[1] ~= ARGV[5] or h[2] ~= ARGV[6] then
  redis.call('DEL', KEYS[4])
  local who = holder(KEYS[5])
  if who then return {'fenced', who[1], who[2], who[3], who[4]} end
  return {'fenced'}
end
local reply = foreign_any(ARGV[2], {ARGV[1]}) or check_mode(KEYS[1], ARGV[3], ARGV[4])
if reply then
  redis.call('DEL', KEYS[4])
else
  reply = place(KEYS[4], KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
end
if ARGV[7] == '1' then redis.call('DEL', KEYS[5]) end
return reply
"#;

/// Get with a size limit checked before the bytes leave the server.
/// KEYS: doc. ARGV: limit.
const GET_LIMITED: &str = r#"
local n = redis.call('HSTRLEN', KEYS[1], 'data')
if n > tonumber(ARGV[1]) then return {'toolarge', n} end
local d = redis.call('HMGET', KEYS[1], 'version', 'data')
if not d[1] then return {'absent'} end
return {'ok', d[1], d[2]}
"#;

/// Acquire, optionally loading a document in the same step. Without a size
/// limit the client loads with a plain HMGET in the same MULTI/EXEC
/// instead, so the bytes skip Lua; with one, the size is checked here
/// before any byte is sent.
/// KEYS: lock, fence counter, locks index, lock runs index, doc, docs index.
/// ARGV: owner json, oid, ttl ms, run, load (0|1), limit ('' = none), doc
/// name ('' for a run lock).
const ACQUIRE: &str = r#"
if WEPP then
  local names
  if ARGV[7] ~= '' then names = {ARGV[7]} else names = redis.call('ZRANGE', KEYS[6], 0, -1) end
  local f = foreign_any(ARGV[4], names)
  if f then return f end
end
local who = holder(KEYS[1])
if who then return {'locked', who[1], who[2], who[3], who[4]} end
local fence, first = counter(KEYS[2])
-- A lock is indexed once, when its fence counter is created; the index
-- lives as long as the counters, and listing skips locks not held.
if first then
  redis.call('SADD', KEYS[3], KEYS[1])
  redis.call('ZADD', KEYS[4], 0, ARGV[4])
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'oid', ARGV[2], 'fence', fence, 'ttl', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[5] == '1' then
  if ARGV[6] ~= '' then
    local n = redis.call('HSTRLEN', KEYS[5], 'data')
    if n > tonumber(ARGV[6]) then
      redis.call('DEL', KEYS[1])
      return {'toolarge', n}
    end
  end
  local d = redis.call('HMGET', KEYS[5], 'version', 'data')
  return {'ok', fence, d[1], d[2]}
end
return {'ok', fence}
"#;

/// Pins 'since' before the TTL changes, since it can no longer be derived
/// after. KEYS: lock. ARGV: oid, fence, ttl ms.
const RENEW: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'oid', 'fence', 'since', 'ttl')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  local since = since_of({h[1], h[2], h[3], h[4]}, redis.call('PTTL', KEYS[1]))
  redis.call('HSET', KEYS[1], 'since', since, 'ttl', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'ok'}
end
local who = holder(KEYS[1])
if who then return {'lost', who[1], who[2], who[3], who[4]} end
return {'lost'}
"#;

/// KEYS: lock. ARGV: oid, fence.
const RELEASE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'oid', 'fence')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return {'ok'}
end
local who = holder(KEYS[1])
if who then return {'lost', who[1], who[2], who[3], who[4]} end
return {'lost'}
"#;

/// KEYS: lock. ARGV: only this fence ('' = any).
const BREAK: &str = r#"
local who = holder(KEYS[1])
if not who then return {'free'} end
if ARGV[1] ~= '' and who[2] ~= ARGV[1] then return {'free'} end
redis.call('DEL', KEYS[1])
return {'ok', who[1], who[2], who[3], who[4]}
"#;

/// KEYS: lock.
const INSPECT: &str = r#"
local who = holder(KEYS[1])
if not who then return {'free'} end
return {'ok', who[1], who[2], who[3], who[4]}
"#;

/// The held locks of a run. KEYS: locks index.
const LIST_LOCKS: &str = r#"
local out = {'ok'}
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local who = holder(k)
  if who then
    for _, x in ipairs({k, who[1], who[2], who[3], who[4]}) do table.insert(out, x) end
  end
end
return out
"#;

/// KEYS: doc, docs index, runs index. ARGV: name, run, if version ('' = any).
const DELETE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return {'absent'} end
local f = foreign_any(ARGV[2], {ARGV[1]})
if f then return f end
if ARGV[3] ~= '' and cur ~= ARGV[3] then return {'precondition'} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[2]) end
return {'ok'}
"#;

/// One page of documents with versions and sizes.
/// KEYS: docs index. ARGV: after ('' = from the start), limit, doc key prefix.
const LIST_DOCS: &str = r#"
local min = '-'
if ARGV[1] ~= '' then min = '(' .. ARGV[1] end
local limit = tonumber(ARGV[2])
local names = redis.call('ZRANGEBYLEX', KEYS[1], min, '+', 'LIMIT', 0, limit + 1)
local more = 0
if #names > limit then more = 1 end
local out = {'ok', more}
for i = 1, math.min(#names, limit) do
  local k = ARGV[3] .. names[i]
  local v = redis.call('HGET', k, 'version')
  if v then
    table.insert(out, names[i])
    table.insert(out, v)
    table.insert(out, redis.call('HSTRLEN', k, 'data'))
  end
end
return out
"#;

/// Deletes up to `batch` documents of a run.
/// KEYS: docs index, runs index. ARGV: run, doc key prefix, batch.
const DELETE_RUN: &str = r#"
local names = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local f = foreign_any(ARGV[1], names)
if f then return f end
for _, n in ipairs(names) do redis.call('DEL', ARGV[2] .. n) end
if #names > 0 then redis.call('ZREM', KEYS[1], unpack(names)) end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return {'ok', #names, left}
"#;

/// The loaded scripts of one store.
pub(crate) struct Scripts {
    pub(crate) put: Script,
    pub(crate) save: Script,
    pub(crate) get_limited: Script,
    pub(crate) acquire: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) break_lock: Script,
    pub(crate) inspect: Script,
    pub(crate) list_locks: Script,
    pub(crate) delete: Script,
    pub(crate) list_docs: Script,
    pub(crate) delete_run: Script,
}

impl Scripts {
    /// The scripts, with the WEPPcloud settings (or their absence) written
    /// into them, so no call carries them as arguments.
    pub(crate) fn new(weppcloud: Option<&WeppcloudLocks>, home_db: i64) -> Self {
        let settings = match weppcloud {
            Some(locks) => format!(
                "local WEPP = true\nlocal WEPP_DB = '{}'\nlocal WEPP_HOME = '{home_db}'\nlocal WEPP_EXT = '.{}'\n",
                locks.db, locks.ext
            ),
            None => {
                "local WEPP = false\nlocal WEPP_DB, WEPP_HOME, WEPP_EXT = '0', '0', ''\n".to_owned()
            }
        };
        let script = |body: &str| Script::new(&format!("{settings}{PRELUDE}\n{body}"));
        Scripts {
            put: script(PUT),
            save: script(SAVE),
            get_limited: script(GET_LIMITED),
            acquire: script(ACQUIRE),
            renew: script(RENEW),
            release: script(RELEASE),
            break_lock: script(BREAK),
            inspect: script(INSPECT),
            list_locks: script(LIST_LOCKS),
            delete: script(DELETE),
            list_docs: script(LIST_DOCS),
            delete_run: script(DELETE_RUN),
        }
    }

    pub(crate) fn all(&self) -> [&Script; 12] {
        [
            &self.put,
            &self.save,
            &self.get_limited,
            &self.acquire,
            &self.renew,
            &self.release,
            &self.break_lock,
            &self.inspect,
            &self.list_locks,
            &self.delete,
            &self.list_docs,
            &self.delete_run,
        ]
    }
}
