//! The server-side scripts: each operation is one `EVALSHA` (loaded once,
//! reloaded transparently after `NOSCRIPT` by the redis crate), so every
//! check is atomic with its write and costs one round trip.
//!
//! Replies are arrays whose first element says what happened: `ok`,
//! `applied` (a write sent again after its reply was lost, found in place
//! by its version: nothing written again, nothing announced), `exists`, `precondition`, `fenced`, `locked`, `lost`, `foreign` (a
//! WEPPcloud lock), `watermark` (a fence below its lock's watermark, with
//! the watermark), `unchanged`, `changed`, `toolarge`, `absent`, `free`,
//! `badttl` (a TTL argument that is not a whole number of milliseconds
//! in 1 ..= `MAX_TTL`, written as plain digits, refused before any write) and `failed` (a
//! write whose command failed, e.g. `WRONGTYPE`, with the server's
//! message; the staged bytes are dropped and, in save-and-release, the
//! lease released).
//!
//! The common paths are kept to as few server calls as possible (a locked
//! update is one script to acquire with a pipelined HMGET to load, and one
//! MULTI/EXEC to save-and-release), since every call counts against the
//! benchmark's raw `GET`/`SET` baseline.
//!
//! Two rules hold in every script:
//!
//! - **No lock hash without an expiry.** Every TTL argument is checked at
//!   the top of its script, before any write (`badttl`); a new grant is
//!   written with `HSET` and its `PEXPIRE` checked right after, the hash
//!   deleted if that ever failed; an existing hash gets its new expiry
//!   before its fields change. Redis does not roll a failing script back,
//!   so the order is what keeps a half-done grant from living forever.
//! - **Scripts touch only their run's `{run}` slot** (plus
//!   WEPPcloud's keys when enabled): no store-wide index of locks is kept,
//!   and `list_locks(None)` finds lock keys with `SCAN` instead. (On one
//!   server, document writes still maintain the store-wide `runs` index;
//!   on a cluster the client passes the run's own docs index in its place
//!   and the scripts skip it, so nothing store-wide is written.)
//!
//! And one for change events: **every write announces itself, from the
//! script (or transaction) that makes it**, on the run's channel
//! `<prefix>:{run}:events` (see [`keys`]): a document written
//! (`c <version> <doc>`), deleted (`d <doc>`), a lock released by its
//! holder, by save-and-release or broken (`r <fence> [<doc>]`). A `PUBLISH`
//! inside the script costs no round trip and is atomic with the write: a
//! listener that is subscribed sees every acknowledged write, in order. An
//! expiring lease announces nothing (Redis runs no script on expiry); its
//! waiters wake by their backoff, which never outlasts the holder's TTL.

use redis::Script;

use crate::config::WeppcloudLocks;

/// [`runstate_core::MAX_TTL`] in milliseconds: the scripts refuse any TTL
/// argument above it (the client checks first; this is the last line).
pub(crate) const MAX_TTL_MS: u128 = runstate_core::MAX_TTL.as_millis();

/// Helpers the scripts call; each script carries only those it calls
/// (see `prelude_for`), at its top or, for helpers only one branch needs,
/// written into that branch (`--[[FOREIGN]]`, `--[[BELOW]]`,
/// `--[[HOLDER]]`). `WEPP*` and `MAX_TTL_MS` are filled in per store;
/// [`FOREIGN`] and [`BELOW`] follow it.
///
/// Numbers above 2^47 go through `string.format('%d')`: Redis turns a Lua
/// number into a string with 14 significant digits, which would mangle a
/// 16-digit counter.
const PRELUDE: &str = r#"
-- A TTL argument: whole milliseconds, 1 ..= MAX_TTL_MS, as digits without
-- a leading zero. Returned as given, or false: commands get the string,
-- since a Lua number passed to a command is formatted back by `snprintf`.
local function ttl_arg(arg)
  if not (arg and string.find(arg, '^[1-9]%d*$')) or tonumber(arg) > MAX_TTL_MS then return false end
  return arg
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Grants store 'since'; a grant written by an older version of this
-- backend may lack it, and then it is derived as now - (ttl - pttl).
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
-- Announces a change on the run's channel ('' = nobody to tell).
local function emit(channel, message)
  if channel ~= '' then redis.call('PUBLISH', channel, message) end
end
-- The lock part of a release announcement: the document's name, or
-- nothing for the run lock.
local function released(channel, fence, name)
  if name ~= '' then emit(channel, 'r ' .. fence .. ' ' .. name) else emit(channel, 'r ' .. fence) end
end
"#;

/// The WEPPcloud lock check of the scripts that write or grant: part of
/// the prelude, and written into the `if WEPP` branches of [`WRITE`] and
/// [`ACQUIRE`] (`--[[FOREIGN]]`), where it is defined only when that
/// branch runs.
const FOREIGN: &str = r#"
local function home_db()
  if WEPP and WEPP_DB ~= WEPP_HOME then redis.call('SELECT', WEPP_HOME) end
end
local function foreign_any(run, names)
  if not WEPP then return false end
  for _, n in ipairs(names) do
    local key = 'nodb-lock:' .. run .. ':' .. n .. WEPP_EXT
    if WEPP_DB ~= WEPP_HOME then redis.call('SELECT', WEPP_DB) end
    local v = redis.call('GET', key)
    local ttl = redis.call('PTTL', key)
    home_db()
    if v then return {'foreign', v, ttl, n} end
  end
  return false
end
"#;

/// The fence comparison (part of the prelude, and defined inside
/// [`WRITE`] only for a write under a lease granted elsewhere).
const BELOW: &str = r#"
-- Whether decimal fence `a` is below decimal fence `b`. Compared as
-- strings (both without leading zeros), since a Lua number keeps only 53
-- bits and fences are 64.
local function below(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
"#;

// The bytes of a write never pass through Lua (copying a 4 KiB argument
// into the interpreter costs more than the whole write): the client stages
// the new document with `HSET <staging> version <v> data <bytes>` and the
// script, in the same MULTI/EXEC, checks and then RENAMEs the staging hash
// over the document, or deletes it when the write is refused. Versions are
// 128-bit tokens unique to a write, made by the client, so no counter
// call is needed.
// An unconditional, unfenced write runs the script too: Redis runs the rest
// of a MULTI/EXEC after a failed command, so only the script can leave a
// refused write unindexed and unannounced (see `Inner::write_commands`).

/// Checks and places a staged write, leaving the reply in `reply`: the
/// block both write scripts ([`PUT`], [`SAVE`]) are built around.
/// KEYS[1] doc, [2] docs index, [3] runs index, [4] staging, [5] the lock's
/// watermark; ARGV[1] name, [2] run, [3] mode (o|c|u), [4] expected
/// version, [5] the new version, [6] events channel, [7] fence of a lease
/// granted elsewhere ('' = none). Such a fence below the watermark is
/// refused ('watermark', nothing written); one at or above it raises the
/// watermark with the write. The version is read in every mode, so a
/// document key that is not a document hash fails the write (WRONGTYPE)
/// instead of being replaced. Any command error becomes a 'failed' reply
/// after the staged bytes are dropped and the home database is selected
/// again. A write that was placed is announced.
///
/// Straight-line code rather than calls of prelude functions: every
/// `local function` of a script makes a closure on every call, and making
/// the prelude's closures cost the conditional put about a quarter of its
/// server time (20 µs against 15 µs per call, `INFO commandstats`). The
/// helpers it needs only with WEPPcloud locks or a foreign fence are
/// defined in those branches (`--[[FOREIGN]]`, `--[[BELOW]]`).
const WRITE: &str = r#"
local ok, reply = pcall(function()
  -- This very write, sent again after its reply was lost: versions are
  -- unique to a write, so it was placed (and announced) already, before
  -- any WEPPcloud lock or higher fence that came after it. A document key
  -- that is not a document hash fails the write below, after those checks,
  -- as before.
  local read, cur = pcall(redis.call, 'HGET', KEYS[1], 'version')
  if read and cur == ARGV[5] then return {'applied'} end
  if WEPP then
--[[FOREIGN]]
    local f = foreign_any(ARGV[2], {ARGV[1]})
    if f then return f end
  end
  local mark = false
  if ARGV[7] ~= '' then
--[[BELOW]]
    mark = redis.call('GET', KEYS[5])
    if mark and below(ARGV[7], mark) then return {'watermark', mark} end
  end
  if not read then error(cur) end
  if ARGV[3] == 'c' and cur then return {'exists'} end
  if ARGV[3] == 'u' and cur ~= ARGV[4] then return {'precondition'} end
  if ARGV[7] ~= '' and mark ~= ARGV[7] then redis.call('SET', KEYS[5], ARGV[7]) end
  -- Index first: if indexing fails nothing is placed; a name indexed
  -- without its document is skipped by listings.
  -- A run is in the runs index exactly while its index is not empty; an
  -- update found the document, so it is indexed already. On a cluster the
  -- client passes the docs index as the runs index (no store-wide key
  -- there).
  if ARGV[3] ~= 'u' and redis.call('ZADD', KEYS[2], 0, ARGV[1]) == 1 and KEYS[3] ~= KEYS[2] then
    redis.call('ZADD', KEYS[3], 0, ARGV[2])
  end
  redis.call('RENAME', KEYS[4], KEYS[1])
  return {'ok'}
end)
if not ok then
  if WEPP and WEPP_DB ~= WEPP_HOME then redis.call('SELECT', WEPP_HOME) end
  if type(reply) == 'table' and reply.err then
    reply = {'failed', reply.err}
  else
    reply = {'failed', tostring(reply)}
  end
end
if reply[1] == 'ok' then
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], 'c ' .. ARGV[5] .. ' ' .. ARGV[1]) end
else
  redis.call('DEL', KEYS[4])
end
"#;

/// Conditional (or, with WEPPcloud locks or a lease granted elsewhere,
/// any) put without a lease of this store: [`WRITE`] alone, without the
/// prelude.
/// KEYS: doc, docs index, runs index, staging, watermark.
/// ARGV: name, run, mode (o|c|u), expected version, new version, events
/// channel, foreign fence ('' = none).
const PUT: &str = r#"
--[[WRITE]]
return reply
"#;

/// Fenced put, optionally releasing the lease (save-and-release). Once the
/// lease is found current, the lease is released whatever the write's
/// outcome: written, refused by its condition or by WEPPcloud, or failed
/// with a command error (`failed`). Only a lease that is no longer current
/// (`fenced`) is left alone, since it is not ours to release. A release is
/// announced (after the write's own announcement), so waiters anywhere
/// retry at once.
/// KEYS: doc, docs index, runs index, staging, watermark, lock.
/// ARGV: as PUT, then lease oid, lease fence, release (0|1), lock's
/// document name ('' for the run lock).
///
/// Straight-line, like [`WRITE`]: the helpers that describe the holder of
/// a lease found not current are defined in that branch (`--[[HOLDER]]`),
/// and the release is announced inline (the announcement of `released`).
const SAVE: &str = r#"
local h = redis.call('HMGET', KEYS[6], 'oid', 'fence')
if h[1] ~= ARGV[8] or h[2] ~= ARGV[9] then
  redis.call('DEL', KEYS[4])
  -- A save-and-release sent again after its reply was lost finds its
  -- lease released by its first run, and its version in place. (Read
  -- under pcall: a document key that is not a hash is just not ours.)
  local placed, cur = pcall(redis.call, 'HGET', KEYS[1], 'version')
  if placed and cur == ARGV[5] then return {'applied'} end
--[[HOLDER]]
  local who = holder(KEYS[6])
  if who then return {'fenced', who[1], who[2], who[3], who[4]} end
  return {'fenced'}
end
--[[WRITE]]
if ARGV[10] == '1' then
  redis.call('DEL', KEYS[6])
  if ARGV[6] ~= '' then
    if ARGV[11] ~= '' then
      redis.call('PUBLISH', ARGV[6], 'r ' .. ARGV[9] .. ' ' .. ARGV[11])
    else
      redis.call('PUBLISH', ARGV[6], 'r ' .. ARGV[9])
    end
  end
end
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
/// limit the client loads with a plain HMGET pipelined behind the script
/// instead, so the bytes skip Lua; with one, the size is checked here
/// before anything is granted or sent.
///
/// Idempotent by owner: when the same owner id holds a live grant, that
/// grant is returned again (same fence, same 'since') with its TTL
/// restarted, so a retry after a lost reply gets its grant back. A new
/// grant's fence is `max(counter + 1, server clock in µs)`.
///
/// Order: the TTL is checked before anything else; a new hash gets its
/// `PEXPIRE` right after its `HSET`, and is deleted should that fail; an
/// existing one gets its new expiry before its fields change.
/// KEYS: lock, fence counter, locks index, doc, docs index.
/// ARGV: owner json, oid, ttl ms, run, load (0|1), limit ('' = none), doc
/// name ('' for a run lock).
/// Reply: ok, fence, since ms[, version, data] | locked, holder… |
/// foreign, … | toolarge, size | badttl.
///
/// Straight-line code, as [`WRITE`] is, since it runs on every locked
/// update: only `ttl_arg` is a prelude helper, the WEPPcloud check is
/// defined in its branch (`--[[FOREIGN]]`), and clock and fence are
/// handled as decimal strings. Against the version that called helpers
/// for the clock, the fence and 'since', a new grant costs the server 16%
/// fewer instructions (81 k against 97 k per call, callgrind).
const ACQUIRE: &str = r#"
local ttl = ttl_arg(ARGV[3])
if not ttl then return {'badttl'} end
if WEPP then
--[[FOREIGN]]
  local names
  if ARGV[7] ~= '' then names = {ARGV[7]} else names = redis.call('ZRANGE', KEYS[5], 0, -1) end
  local f = foreign_any(ARGV[4], names)
  if f then return f end
end
local h = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'since', 'ttl', 'oid')
local since = h[3]
if h[1] then
  local pttl = redis.call('PTTL', KEYS[1])
  if not since then
    -- A grant written by an older version of this backend may lack
    -- 'since': it is now - (ttl - pttl).
    local t = redis.call('TIME')
    since = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - (tonumber(h[4]) - pttl))
  end
  if h[5] ~= ARGV[2] then return {'locked', h[1], h[2], since, pttl} end
end
if ARGV[5] == '1' and ARGV[6] ~= '' then
  local n = redis.call('HSTRLEN', KEYS[4], 'data')
  if n > tonumber(ARGV[6]) then return {'toolarge', n} end
end
local fence = h[2]
if h[1] then
  -- The owner's own live grant: hand it back, TTL restarted.
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('HSET', KEYS[1], 'since', since, 'ttl', ttl)
else
  -- A new grant. Its fence is max(counter + 1, server clock in µs), stored
  -- back: the clock term keeps fences increasing when the counter goes
  -- back in time (a restart from an older snapshot, a truncated AOF, a
  -- promoted replica that missed the last grants). The clock comes as
  -- decimal strings cut from TIME's fields, and the two are compared as
  -- decimal strings (no leading zeros: the longer is larger), so the
  -- common case, the clock ahead of the counter, parses and formats no
  -- number.
  local t = redis.call('TIME')
  local us = string.sub('00000' .. t[2], -6)
  local now = t[1] .. us
  since = t[1] .. string.sub(us, 1, 3)
  fence = now
  local cur = redis.call('GET', KEYS[2])
  if not cur then
    -- A lock is indexed when its fence counter is created; the index lives
    -- as long as the counters, and listing skips locks not held.
    redis.call('SADD', KEYS[3], KEYS[1])
  elseif not string.find(cur, '^[1-9]%d*$') then
    -- Not as this script writes it (leading zeros, a sign): by number.
    local after = tonumber(cur) + 1
    if after > tonumber(now) then fence = string.format('%d', after) end
  elseif #cur > #now or (#cur == #now and cur >= now) then
    -- Counter + 1, digit by digit: exact for any 64-bit counter, where a
    -- Lua number keeps 53 bits.
    local i = #cur
    while string.byte(cur, i) == 57 do i = i - 1 end
    if i == 0 then
      fence = '1' .. string.rep('0', #cur)
    else
      fence = string.sub(cur, 1, i - 1) .. string.char(string.byte(cur, i) + 1) .. string.rep('0', #cur - i)
    end
  end
  redis.call('SET', KEYS[2], fence)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'oid', ARGV[2], 'fence', fence, 'since', since, 'ttl', ttl)
  if redis.pcall('PEXPIRE', KEYS[1], ttl) ~= 1 then
    redis.call('DEL', KEYS[1])
    return {'badttl'}
  end
end
if ARGV[5] == '1' then
  local d = redis.call('HMGET', KEYS[4], 'version', 'data')
  return {'ok', fence, since, d[1], d[2]}
end
return {'ok', fence, since}
"#;

/// Restarts a held lease's TTL. The TTL is checked before anything else,
/// and the expiry is set before the fields change (pinning 'since' for a
/// grant that lacks it, since it can no longer be derived after).
/// KEYS: lock. ARGV: oid, fence, ttl ms.
const RENEW: &str = r#"
local ttl = ttl_arg(ARGV[3])
if not ttl then return {'badttl'} end
local h = redis.call('HMGET', KEYS[1], 'oid', 'fence', 'since', 'ttl')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  local since = since_of(h, redis.call('PTTL', KEYS[1]))
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('HSET', KEYS[1], 'since', since, 'ttl', ARGV[3])
  return {'ok'}
end
local who = holder(KEYS[1])
if who then return {'lost', who[1], who[2], who[3], who[4]} end
return {'lost'}
"#;

/// KEYS: lock. ARGV: oid, fence, events channel, lock's document name
/// ('' for the run lock).
const RELEASE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'oid', 'fence')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  released(ARGV[3], ARGV[2], ARGV[4])
  return {'ok'}
end
local who = holder(KEYS[1])
if who then return {'lost', who[1], who[2], who[3], who[4]} end
return {'lost'}
"#;

/// KEYS: lock. ARGV: only this fence ('' = any), events channel, lock's
/// document name ('' for the run lock).
const BREAK: &str = r#"
local who = holder(KEYS[1])
if not who then return {'free'} end
if ARGV[1] ~= '' and who[2] ~= ARGV[1] then return {'free'} end
redis.call('DEL', KEYS[1])
released(ARGV[2], who[2], ARGV[3])
return {'ok', who[1], who[2], who[3], who[4]}
"#;

/// Also run once per lock key, pipelined, by `list_locks(None)`.
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

/// KEYS: doc, docs index, runs index. ARGV: name, run, `=` and the
/// version it must have ('' = any), events channel.
const DELETE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return {'absent'} end
local f = foreign_any(ARGV[2], {ARGV[1]})
if f then return f end
if ARGV[3] ~= '' and '=' .. cur ~= ARGV[3] then return {'precondition'} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[3] ~= KEYS[2] and redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[2]) end
emit(ARGV[4], 'd ' .. ARGV[1])
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
  -- A key of another type (another client's) is not a document: skipped
  -- like a name without its document, not a WRONGTYPE for the listing.
  local v = redis.call('TYPE', k).ok == 'hash' and redis.call('HGET', k, 'version')
  if v then
    table.insert(out, names[i])
    table.insert(out, v)
    table.insert(out, redis.call('HSTRLEN', k, 'data'))
  end
end
return out
"#;

/// Deletes up to `batch` documents of a run, announcing each; once none is
/// left, the run's milestones and status history go too (run metadata,
/// deleted with the run; fence counters and watermarks stay).
/// KEYS: docs index, runs index, milestones, status stream. ARGV: run, doc
/// key prefix, batch, events channel.
const DELETE_RUN: &str = r#"
local names = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local f = foreign_any(ARGV[1], names)
if f then return f end
for _, n in ipairs(names) do redis.call('DEL', ARGV[2] .. n) end
if #names > 0 then redis.call('ZREM', KEYS[1], unpack(names)) end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then
  if KEYS[2] ~= KEYS[1] then redis.call('ZREM', KEYS[2], ARGV[1]) end
  redis.call('DEL', KEYS[3], KEYS[4])
end
for _, n in ipairs(names) do emit(ARGV[4], 'd ' .. n) end
return {'ok', #names, left}
"#;

/// Raises a lock's fence watermark to a fence granted by another lock
/// service (never lowers it; equal is fine) and, with a size limit, reads
/// the document in the same step. Without a limit the client reads with an
/// HMGET in the same MULTI/EXEC instead, so the bytes skip Lua.
/// KEYS: watermark, doc. ARGV: fence, load (0|1), limit ('' = none).
/// Reply: ok[, version, data] | watermark, current | toolarge, size.
const CLAIM: &str = r#"
local mark = redis.call('GET', KEYS[1])
if mark and below(ARGV[1], mark) then return {'watermark', mark} end
if mark ~= ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then
    local n = redis.call('HSTRLEN', KEYS[2], 'data')
    if n > tonumber(ARGV[3]) then return {'toolarge', n} end
  end
  local d = redis.call('HMGET', KEYS[2], 'version', 'data')
  return {'ok', d[1], d[2]}
end
return {'ok'}
"#;

/// A conditional read: nothing but the answer when the stored version is
/// the known one, whatever the document's size.
/// KEYS: doc. ARGV: known version, limit ('' = none).
/// Reply: unchanged | absent | changed, version, data | toolarge, size.
const GET_IF_CHANGED: &str = r#"
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {'absent'} end
if v == ARGV[1] then return {'unchanged'} end
if ARGV[2] ~= '' then
  local n = redis.call('HSTRLEN', KEYS[1], 'data')
  if n > tonumber(ARGV[2]) then return {'toolarge', n} end
end
return {'changed', v, redis.call('HGET', KEYS[1], 'data')}
"#;

/// Appends a status message to the run's stream, capped at about `keep`
/// messages (`MAXLEN ~`) and, with a maximum age, trimmed of older ones
/// exactly (`MINID`, by the server's clock: approximate trimming would
/// keep a whole stream node of old messages), then announces it with its
/// id.
/// KEYS: stream. ARGV: status channel, topic, text, at (ms, publisher's
/// clock), keep, max age ms ('' = none).
/// Reply: ok, id.
const PUBLISH_STATUS: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'topic', ARGV[2], 'text', ARGV[3], 'at', ARGV[4])
if ARGV[6] ~= '' then
  local oldest = now_ms() - tonumber(ARGV[6])
  if oldest > 0 then redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', oldest)) end
end
redis.call('PUBLISH', ARGV[1], id .. ' ' .. ARGV[4] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return {'ok', id}
"#;

/// Defines [`Scripts`] from one list of names, in the order of
/// [`sources`]: its fields, [`Scripts::new`] and [`Scripts::all`].
macro_rules! scripts {
    ($($name:ident),+ $(,)?) => {
        /// The loaded scripts of one store.
        pub(crate) struct Scripts {
            $(pub(crate) $name: Script,)+
        }

        impl Scripts {
            /// The scripts, with the WEPPcloud settings (or their absence)
            /// written into them, so no call carries them as arguments.
            pub(crate) fn new(weppcloud: Option<&WeppcloudLocks>, home_db: i64) -> Self {
                let [$($name),+] = sources(weppcloud, home_db).map(|code| Script::new(&code));
                Scripts { $($name),+ }
            }

            pub(crate) fn all(&self) -> [&Script; SCRIPTS] {
                [$(&self.$name),+]
            }
        }
    };
}

scripts!(
    put,
    save,
    get_limited,
    acquire,
    renew,
    release,
    break_lock,
    inspect,
    list_locks,
    delete,
    list_docs,
    delete_run,
    claim,
    get_if_changed,
    publish_status,
);

/// How many scripts there are.
const SCRIPTS: usize = 15;

/// The source of every script, in the order of [`Scripts::all`], with the
/// WEPPcloud settings (or their absence) written into them, so no call
/// carries them as arguments, and the helpers each calls.
fn sources(weppcloud: Option<&WeppcloudLocks>, home_db: i64) -> [String; SCRIPTS] {
    let settings = match weppcloud {
        Some(locks) => format!(
            "local WEPP = true\nlocal WEPP_DB = '{}'\nlocal WEPP_HOME = '{home_db}'\nlocal WEPP_EXT = '.{}'\n",
            locks.db, locks.ext
        ),
        None => {
            "local WEPP = false\nlocal WEPP_DB, WEPP_HOME, WEPP_EXT = '0', '0', ''\n".to_owned()
        }
    };
    let settings = format!("{settings}local MAX_TTL_MS = {MAX_TTL_MS}\n");
    let prelude = format!("{PRELUDE}{FOREIGN}{BELOW}");
    let helpers = helpers(&prelude);
    let script = |body: &str| format!("{settings}{}\n{body}", prelude_for(&helpers, body));
    let write = WRITE
        .replace("--[[FOREIGN]]", FOREIGN)
        .replace("--[[BELOW]]", BELOW);
    // The helpers a branch defines for itself, in the prelude's order.
    let inline = |names: &[&str]| -> String {
        helpers
            .iter()
            .filter(|(name, _)| names.contains(name))
            .map(|(_, code)| code.as_str())
            .collect()
    };
    let save = SAVE
        .replace("--[[HOLDER]]", &inline(&["now_ms", "since_of", "holder"]))
        .replace("--[[WRITE]]", &write);
    [
        script(&PUT.replace("--[[WRITE]]", &write)),
        script(&save),
        script(GET_LIMITED),
        script(&ACQUIRE.replace("--[[FOREIGN]]", FOREIGN)),
        script(RENEW),
        script(RELEASE),
        script(BREAK),
        script(INSPECT),
        script(LIST_LOCKS),
        script(DELETE),
        script(LIST_DOCS),
        script(DELETE_RUN),
        script(CLAIM),
        script(GET_IF_CHANGED),
        script(PUBLISH_STATUS),
    ]
}

/// The helper functions of `prelude`, in order: each `local function`
/// from its first line to the `end` that closes it (the first line that is
/// just `end`), with its name.
fn helpers(prelude: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut lines = prelude.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("local function ") else {
            continue;
        };
        let name = rest.split('(').next().unwrap_or(rest);
        let mut code = format!("{line}\n");
        for line in lines.by_ref() {
            code.push_str(line);
            code.push('\n');
            if line == "end" {
                break;
            }
        }
        out.push((name, code));
    }
    out
}

/// The helpers `body` calls and does not define itself, with the helpers
/// they call in turn, in the prelude's order. Every `local function` of a
/// script is a closure made on every call (see [`WRITE`]), so a script
/// carries only those it uses.
fn prelude_for(helpers: &[(&str, String)], body: &str) -> String {
    let calls = |text: &str, name: &str| text.contains(&format!("{name}("));
    let mut needed: Vec<bool> = helpers
        .iter()
        .map(|(name, _)| calls(body, name) && !body.contains(&format!("local function {name}(")))
        .collect();
    // Helpers call only helpers defined before them: one pass from the end
    // reaches every one needed.
    for i in (0..helpers.len()).rev() {
        if needed[i] {
            for (j, (name, _)) in helpers.iter().enumerate().take(i) {
                if calls(&helpers[i].1, name) {
                    needed[j] = true;
                }
            }
        }
    }
    helpers
        .iter()
        .zip(needed)
        .filter(|(_, needed)| *needed)
        .map(|((_, code), _)| code.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    /// Each script carries exactly the helpers it calls (and those they
    /// call), each once: none is defined in a script that never calls it,
    /// and none is missing (a script calling an undefined helper would
    /// fail at its first call, which the conformance suite would show).
    #[test]
    fn each_script_defines_only_the_helpers_it_calls() {
        let all = format!("{PRELUDE}{FOREIGN}{BELOW}");
        let helpers = helpers(&all);
        let names: Vec<&str> = helpers.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "ttl_arg",
                "now_ms",
                "since_of",
                "holder",
                "emit",
                "released",
                "home_db",
                "foreign_any",
                "below"
            ]
        );
        let defined = |code: &str| -> Vec<String> {
            names
                .iter()
                .filter(|n| code.contains(&format!("local function {n}(")))
                .map(|n| (*n).to_owned())
                .collect()
        };
        for weppcloud in [false, true] {
            let locks = WeppcloudLocks {
                db: 0,
                ext: "nodb".to_owned(),
            };
            let sources = sources(weppcloud.then_some(&locks), 0);
            // The release (6th): its own check, `released` and `emit` for
            // the announcement, `holder` and `since_of`/`now_ms`
            // for a lost lease; no TTL or WEPPcloud helpers.
            assert_eq!(
                defined(&sources[5]),
                ["now_ms", "since_of", "holder", "emit", "released"]
            );
            // The conditional put: no helper but those its own branches
            // define.
            assert!(!sources[0].contains("local function holder("));
            // The save (2nd) and the acquire (4th), straight-line: the
            // save's helpers are all written into its branches (the
            // holder of a lost lease, the write's WEPPcloud and fence
            // checks); the acquire takes only the TTL check from the top.
            assert_eq!(
                defined(&sources[1]),
                [
                    "now_ms",
                    "since_of",
                    "holder",
                    "home_db",
                    "foreign_any",
                    "below"
                ]
            );
            assert!(!sources[1].contains("local function emit("));
            assert_eq!(defined(&sources[3]), ["ttl_arg", "home_db", "foreign_any"]);
            let top = |code: &str, name: &str| code.find(&format!("local function {name}("));
            assert!(top(&sources[3], "ttl_arg") < top(&sources[3], "home_db"));
            for code in &sources {
                for name in &names {
                    let definitions = code.matches(&format!("local function {name}(")).count();
                    assert!(definitions <= 1, "{name} defined {definitions} times");
                    let calls: Vec<usize> = code
                        .match_indices(&format!("{name}("))
                        .map(|(at, _)| at)
                        .filter(|&at| !code[..at].ends_with("local function "))
                        .collect();
                    assert_eq!(
                        definitions == 1,
                        !calls.is_empty(),
                        "{name}: defined {definitions} times, called {} times",
                        calls.len()
                    );
                    // A `local function` is in scope only after it: every
                    // call comes after the definition.
                    if let (Some(defined_at), Some(first_call)) = (top(code, name), calls.first()) {
                        assert!(
                            defined_at < *first_call,
                            "{name} called before it is defined"
                        );
                    }
                }
            }
        }
    }

    async fn shared() -> Option<redis::aio::MultiplexedConnection> {
        let url =
            runstate_conformance::server_url("redis", "RUNSTATE_REDIS_URL", "a Redis script test")?;
        Some(
            redis::Client::open(url.as_str())
                .expect("client")
                .get_multiplexed_async_connection()
                .await
                .expect("connection"),
        )
    }

    fn status(value: redis::RedisResult<Value>) -> (String, Vec<Value>) {
        match value {
            Ok(Value::Array(items)) => match items.first() {
                Some(Value::BulkString(s)) => (String::from_utf8_lossy(s).into_owned(), items),
                other => panic!("no status: {other:?}"),
            },
            other => panic!("the script must answer, not fail: {other:?}"),
        }
    }

    /// Appends a grant of `lock` to owner `o1` with fence 7 and a 30 s
    /// expiry, as the acquire script writes one.
    fn grant(pipe: &mut redis::Pipeline, lock: &str) {
        pipe.cmd("HSET")
            .arg(lock)
            .arg("owner")
            .arg("{}")
            .arg("oid")
            .arg("o1")
            .arg("fence")
            .arg("7")
            .arg("since")
            .arg("0")
            .arg("ttl")
            .arg("30000")
            .ignore()
            .cmd("PEXPIRE")
            .arg(lock)
            .arg(30000)
            .ignore();
    }

    /// A write sent again after its reply was lost (the cluster client
    /// resends a request whose connection dropped, whether or not the
    /// server ran it) is recognised by its version, which is unique to the
    /// write: the resend answers `applied` instead of `exists` (a create),
    /// `precondition` (an update) or `fenced` (a save-and-release, whose
    /// first run released the lease); it writes nothing, announces nothing
    /// and drops the staged bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resent_write_is_recognised_by_its_version() {
        let Some(mut con) = shared().await else {
            return;
        };
        let url =
            runstate_conformance::server_url("redis", "RUNSTATE_REDIS_URL", "a Redis script test")
                .expect("checked by shared()");
        let mut events = redis::Client::open(url.as_str())
            .expect("client")
            .get_async_pubsub()
            .await
            .expect("pubsub");
        let scripts = Scripts::new(None, 0);
        let p = format!("rsunit:{:012x}", fastrand::u64(..) >> 16);
        let (doc, docs, runs, staging, lock, mark, channel) = (
            format!("{p}:{{r}}:doc:d"),
            format!("{p}:{{r}}:docs"),
            format!("{p}:runs"),
            format!("{p}:{{r}}:staging"),
            format!("{p}:{{r}}:lock:d"),
            format!("{p}:{{r}}:watermark:d"),
            format!("{p}:{{r}}:events"),
        );
        events.subscribe(&channel).await.expect("SUBSCRIBE");
        // A pipeline does not load a script the server lacks.
        for script in [&scripts.put, &scripts.save] {
            let _: String = script.load_async(&mut con).await.expect("SCRIPT LOAD");
        }
        // (mode, expected version, new version, lease: release or not)
        // What happens between the first send and the resend.
        #[derive(Clone, Copy, PartialEq)]
        enum Between {
            Nothing,
            /// The lease expires (its hash is gone).
            Expires,
            /// A higher fence granted elsewhere raises the watermark.
            HigherFence,
        }
        // (mode, expected version, new version, lease: release or not,
        // between the sends)
        let cases: [(&str, &str, &str, Option<&str>, Between); 7] = [
            ("c", "", "v1", None, Between::Nothing),
            ("u", "v1", "v2", None, Between::Nothing),
            ("o", "", "v3", None, Between::Nothing),
            ("o", "", "v4", None, Between::HigherFence),
            ("u", "v4", "v5", Some("0"), Between::Nothing),
            ("u", "v5", "v6", Some("0"), Between::Expires),
            ("u", "v6", "v7", Some("1"), Between::Nothing),
        ];
        for (mode, expected, version, release, between) in cases {
            let expires = between == Between::Expires;
            // The fence of a lease granted elsewhere the write carries.
            let foreign = if between == Between::HigherFence {
                "5"
            } else {
                ""
            };
            if release.is_some() {
                let mut pipe = redis::pipe();
                grant(&mut pipe, &lock);
                let () = pipe.query_async(&mut con).await.expect("grant");
            }
            let mut statuses = Vec::new();
            for send in 0..2 {
                if send == 1 && expires {
                    let _: i64 = redis::cmd("DEL")
                        .arg(&lock)
                        .query_async(&mut con)
                        .await
                        .expect("expire");
                }
                if send == 1 && between == Between::HigherFence {
                    let () = redis::cmd("SET")
                        .arg(&mark)
                        .arg("9")
                        .query_async(&mut con)
                        .await
                        .expect("raise the watermark");
                }
                let script = if release.is_some() {
                    &scripts.save
                } else {
                    &scripts.put
                };
                let mut call = script.prepare_invoke();
                call.key(&doc)
                    .key(&docs)
                    .key(&runs)
                    .key(&staging)
                    .key(&mark);
                if release.is_some() {
                    call.key(&lock);
                }
                call.arg("d")
                    .arg("r")
                    .arg(mode)
                    .arg(expected)
                    .arg(version)
                    .arg(&channel)
                    .arg(foreign);
                if let Some(release) = release {
                    call.arg("o1").arg("7").arg(release).arg("d");
                }
                // As the client sends a write: the staged bytes and the
                // script in one MULTI/EXEC.
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("DEL")
                    .arg(&staging)
                    .ignore()
                    .cmd("HSET")
                    .arg(&staging)
                    .arg("version")
                    .arg(version)
                    .arg("data")
                    .arg(format!("bytes of {version}"))
                    .ignore()
                    .invoke_script(&call);
                let replies: Vec<Value> = pipe.query_async(&mut con).await.expect("write");
                let (status, items) = status(Ok(replies.into_iter().next().expect("a reply")));
                statuses.push((status, items));
            }
            assert_eq!(statuses[0].0, "ok", "{mode} {version}: {:?}", statuses[0].1);
            assert_eq!(
                statuses[1].0, "applied",
                "{mode} {version}: the resend is recognised, {:?}",
                statuses[1].1
            );
            let (stored, staged, indexed): (Option<String>, i64, Option<f64>) = redis::pipe()
                .cmd("HGET")
                .arg(&doc)
                .arg("version")
                .cmd("EXISTS")
                .arg(&staging)
                .cmd("ZSCORE")
                .arg(&docs)
                .arg("d")
                .query_async(&mut con)
                .await
                .expect("state");
            assert_eq!(stored.as_deref(), Some(version), "the first write stands");
            assert_eq!(staged, 0, "the resend's staged bytes are dropped");
            assert!(indexed.is_some(), "the document is indexed");
            let lock_left: i64 = redis::cmd("EXISTS")
                .arg(&lock)
                .query_async(&mut con)
                .await
                .expect("EXISTS");
            assert_eq!(
                lock_left,
                i64::from(release == Some("0") && !expires),
                "{mode} {version}: the lease is kept or released as the first send asked"
            );
        }
        // A lease that is not current still gets `fenced` when the
        // document key is not a document hash (its version is read under
        // pcall), and nothing is touched.
        let () = redis::cmd("SET")
            .arg(&doc)
            .arg("not a document")
            .query_async(&mut con)
            .await
            .expect("SET");
        let mut call = scripts.save.prepare_invoke();
        call.key(&doc)
            .key(&docs)
            .key(&runs)
            .key(&staging)
            .key(&mark)
            .key(&lock)
            .arg("d")
            .arg("r")
            .arg("o")
            .arg("")
            .arg("v9")
            .arg(&channel)
            .arg("")
            .arg("o1")
            .arg("7")
            .arg("1")
            .arg("d");
        let (refused, items) = status(call.invoke_async::<Value>(&mut con).await);
        assert_eq!(refused, "fenced", "{items:?}");
        let kept: String = redis::cmd("GET")
            .arg(&doc)
            .query_async(&mut con)
            .await
            .expect("GET");
        assert_eq!(kept, "not a document");
        // One announcement per write (and one per release), none for a
        // resend: a marker published last ends the count.
        let () = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("end")
            .query_async(&mut con)
            .await
            .map(|_: i64| ())
            .expect("PUBLISH");
        let mut stream = events.on_message();
        let mut heard = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
            });
            let message = tokio::time::timeout(std::time::Duration::from_secs(5), next)
                .await
                .expect("announcements arrive")
                .expect("a message");
            let text: String = message.get_payload().expect("text");
            if text == "end" {
                break;
            }
            heard.push(text);
        }
        assert_eq!(
            heard,
            [
                "c v1 d", "c v2 d", "c v3 d", "c v4 d", "c v5 d", "c v6 d", "c v7 d", "r 7 d"
            ],
            "each write announced once"
        );
        let _: i64 = redis::cmd("DEL")
            .arg(&doc)
            .arg(&docs)
            .arg(&runs)
            .arg(&staging)
            .arg(&lock)
            .arg(&mark)
            .query_async(&mut con)
            .await
            .expect("cleanup");
    }

    /// Item 7 at the script level: when a command of the save fails
    /// (WRONGTYPE on a document key that is not a document hash), the save
    /// script still releases the lease and drops the staged bytes, and
    /// answers `failed` instead of aborting half-way; without `release` the
    /// lease is kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn save_script_releases_on_a_command_error() {
        let Some(mut con) = shared().await else {
            return;
        };
        let scripts = Scripts::new(None, 0);
        let p = format!("rsunit:{:012x}", fastrand::u64(..) >> 16);
        let (doc, docs, runs, staging, lock) = (
            format!("{p}:{{r}}:doc:d"),
            format!("{p}:{{r}}:docs"),
            format!("{p}:runs"),
            format!("{p}:{{r}}:staging"),
            format!("{p}:{{r}}:lock:d"),
        );
        let mark = format!("{p}:{{r}}:watermark:d");
        let () = redis::cmd("SET")
            .arg(&doc)
            .arg("not a document")
            .query_async(&mut con)
            .await
            .expect("SET");
        for (mode, expected, release) in [("o", "", "0"), ("u", "v1", "1"), ("o", "", "1")] {
            let mut pipe = redis::pipe();
            grant(&mut pipe, &lock);
            let () = pipe
                .cmd("HSET")
                .arg(&staging)
                .arg("version")
                .arg("v2")
                .arg("data")
                .arg("bytes")
                .ignore()
                .query_async(&mut con)
                .await
                .expect("stage");
            let mut save = scripts.save.prepare_invoke();
            save.key(&doc)
                .key(&docs)
                .key(&runs)
                .key(&staging)
                .key(&mark)
                .key(&lock)
                .arg("d")
                .arg("r")
                .arg(mode)
                .arg(expected)
                .arg("v2")
                .arg("")
                .arg("")
                .arg("o1")
                .arg("7")
                .arg(release)
                .arg("d");
            let (status, items) = status(save.invoke_async::<Value>(&mut con).await);
            assert_eq!(status, "failed", "mode {mode}: {items:?}");
            assert!(
                format!("{items:?}").contains("WRONGTYPE"),
                "the server's reason: {items:?}"
            );
            let (lock_left, staging_left): (i64, i64) = redis::pipe()
                .cmd("EXISTS")
                .arg(&lock)
                .cmd("EXISTS")
                .arg(&staging)
                .query_async(&mut con)
                .await
                .expect("EXISTS");
            assert_eq!(staging_left, 0, "the staged bytes are dropped");
            assert_eq!(
                lock_left,
                i64::from(release == "0"),
                "released exactly when asked (mode {mode}, release {release})"
            );
            let kept: String = redis::cmd("GET")
                .arg(&doc)
                .query_async(&mut con)
                .await
                .expect("GET");
            assert_eq!(kept, "not a document", "nothing written over it");
        }
        let _: i64 = redis::cmd("DEL")
            .arg(&doc)
            .arg(&docs)
            .arg(&runs)
            .arg(&staging)
            .arg(&lock)
            .query_async(&mut con)
            .await
            .expect("cleanup");
    }

    /// Item 9 at the script level: the acquire and renew scripts refuse a
    /// TTL argument the client would never send (bypassing the client's
    /// check) before writing anything, so no lock hash is ever left
    /// without an expiry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripts_refuse_bad_ttls_before_writing() {
        let Some(mut con) = shared().await else {
            return;
        };
        let scripts = Scripts::new(None, 0);
        let p = format!("rsunit:{:012x}", fastrand::u64(..) >> 16);
        let (lock, fence, locks) = (
            format!("{p}:{{r}}:lock:d"),
            format!("{p}:{{r}}:fence:d"),
            format!("{p}:{{r}}:locks"),
        );
        let (doc, docs) = (format!("{p}:{{r}}:doc:d"), format!("{p}:{{r}}:docs"));
        let acquire = |ttl: &str, oid: &str| {
            let mut invocation = scripts.acquire.prepare_invoke();
            invocation
                .key(&lock)
                .key(&fence)
                .key(&locks)
                .key(&doc)
                .key(&docs)
                .arg(r#"{"host":"h","pid":1,"id":"o1"}"#)
                .arg(oid)
                .arg(ttl)
                .arg("r")
                .arg("0")
                .arg("")
                .arg("d");
            invocation
        };
        let status = |value| status(value).0;
        let pttl = |con: &mut redis::aio::MultiplexedConnection| {
            let mut con = con.clone();
            let lock = lock.clone();
            async move {
                redis::cmd("PTTL")
                    .arg(&lock)
                    .query_async::<i64>(&mut con)
                    .await
                    .expect("PTTL")
            }
        };
        let max_plus_one = (MAX_TTL_MS + 1).to_string();
        let bad = [
            "18446744073709551615",
            max_plus_one.as_str(),
            "0",
            "-5",
            "1.5",
            "abc",
            "",
            "1e30",
            "nan",
        ];
        for ttl in bad {
            let reply = acquire(ttl, "o1").invoke_async::<Value>(&mut con).await;
            assert_eq!(status(reply), "badttl", "acquire with ttl {ttl:?}");
            assert_eq!(pttl(&mut con).await, -2, "no lock key after ttl {ttl:?}");
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&fence)
                .arg(&locks)
                .query_async(&mut con)
                .await
                .expect("EXISTS");
            assert_eq!(exists, 0, "nothing written for ttl {ttl:?}");
        }
        let reply = acquire("5000", "o1").invoke_async::<Value>(&mut con).await;
        assert_eq!(status(reply), "ok");
        let granted: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&lock)
            .arg("fence")
            .arg("ttl")
            .query_async(&mut con)
            .await
            .expect("HMGET");
        for ttl in bad {
            let mut renew = scripts.renew.prepare_invoke();
            renew
                .key(&lock)
                .arg("o1")
                .arg(granted[0].as_deref().expect("fence"))
                .arg(ttl);
            let reply = renew.invoke_async::<Value>(&mut con).await;
            assert_eq!(status(reply), "badttl", "renew with ttl {ttl:?}");
            let left = pttl(&mut con).await;
            assert!(left > 0 && left <= 5000, "expiry kept: {left}");
            let after: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&lock)
                .arg("fence")
                .arg("ttl")
                .query_async(&mut con)
                .await
                .expect("HMGET");
            assert_eq!(after, granted, "fields unchanged by a refused renewal");
        }
        let _: i64 = redis::cmd("DEL")
            .arg(&lock)
            .arg(&fence)
            .arg(&locks)
            .query_async(&mut con)
            .await
            .expect("cleanup");
    }
}
