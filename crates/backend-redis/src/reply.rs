//! Reading replies: a script's (its status, then its values), a lock's
//! holder, and the documents read by `HMGET` or by the limited-read script.

use std::time::{Duration, SystemTime};

use redis::Value;
use runstate_core::time::from_unix_millis;
use runstate_core::{Bytes, Error, ErrorKind, Fence, LockInfo, LockKey, Owner, StoredDoc, Version};

use crate::BACKEND;
use crate::errors::{map_redis_error, unexpected};

/// A script's reply: its status and the values after it.
pub(crate) struct Reply {
    pub(crate) status: String,
    values: std::vec::IntoIter<Value>,
}

impl Reply {
    pub(crate) fn parse(value: Value) -> Result<Reply, Error> {
        let Value::Array(items) = value else {
            return Err(unexpected("not an array"));
        };
        let mut values = items.into_iter();
        let status = match values.next() {
            Some(Value::BulkString(bytes)) => {
                String::from_utf8(bytes).map_err(|_| unexpected("status"))?
            }
            Some(Value::SimpleString(text)) => text,
            _ => return Err(unexpected("no status")),
        };
        Ok(Reply { status, values })
    }

    pub(crate) fn next(&mut self) -> Result<Value, Error> {
        self.values.next().ok_or_else(|| unexpected("too short"))
    }

    pub(crate) fn has_more(&self) -> bool {
        self.values.len() > 0
    }

    pub(crate) fn bytes(&mut self) -> Result<Option<Bytes>, Error> {
        match self.next()? {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => Ok(Some(Bytes::from(bytes))),
            Value::SimpleString(text) => Ok(Some(Bytes::from(text))),
            _ => Err(unexpected("not a string")),
        }
    }

    pub(crate) fn text(&mut self) -> Result<String, Error> {
        match self.next()? {
            Value::BulkString(bytes) => {
                String::from_utf8(bytes).map_err(|_| unexpected("not UTF-8"))
            }
            Value::SimpleString(text) => Ok(text),
            Value::Int(n) => Ok(n.to_string()),
            _ => Err(unexpected("not text")),
        }
    }

    /// The next value as text, `None` when it is nil.
    pub(crate) fn text_opt(&mut self) -> Result<Option<String>, Error> {
        match self.bytes()? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| unexpected("version")),
        }
    }

    pub(crate) fn int(&mut self) -> Result<i64, Error> {
        match self.next()? {
            Value::Int(n) => Ok(n),
            Value::BulkString(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| unexpected("not a number")),
            _ => Err(unexpected("not a number")),
        }
    }

    /// owner json, fence, since ms, pttl ms → what anyone sees of the lock.
    pub(crate) fn holder(&mut self, key: &LockKey) -> Result<LockInfo, Error> {
        let owner: Owner =
            serde_json::from_str(&self.text()?).map_err(|_| unexpected("lock owner"))?;
        let fence = self.text()?.parse().map_err(|_| unexpected("fence"))?;
        let since = self.text()?.parse().map_err(|_| unexpected("since"))?;
        let pttl = self.int()?;
        Ok(LockInfo::new(
            key.clone(),
            owner,
            Fence(fence),
            from_unix_millis(since),
            expires_in(pttl),
        ))
    }

    /// The holder if the reply carries one.
    pub(crate) fn maybe_holder(&mut self, key: &LockKey) -> Result<Option<LockInfo>, Error> {
        if self.has_more() {
            self.holder(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A WEPPcloud lock: its JSON payload, PTTL and document name.
    pub(crate) fn weppcloud_holder(&mut self, key: &LockKey) -> Result<(LockInfo, String), Error> {
        let payload = self.text()?;
        let pttl = self.int()?;
        let doc = self.text()?;
        Ok((weppcloud_info(key, &payload, pttl), doc))
    }
}

/// What a WEPPcloud NoDb lock payload says: `{"token", "owner": "host:pid",
/// "acquired_at", "expires_at", "ttl"}` (older payloads are a bare token).
pub(crate) fn weppcloud_info(key: &LockKey, payload: &str, pttl: i64) -> LockInfo {
    let parsed: serde_json::Value =
        serde_json::from_str(payload).unwrap_or(serde_json::Value::Null);
    let owner_text = parsed
        .get("owner")
        .and_then(|o| o.as_str())
        .unwrap_or("weppcloud:0");
    let (host, pid) = owner_text
        .rsplit_once(':')
        .map_or((owner_text, 0), |(h, p)| (h, p.parse().unwrap_or(0)));
    let token = parsed
        .get("token")
        .and_then(|t| t.as_str())
        .unwrap_or(payload);
    // The token is what WEPPcloud's unlock and dump guard check, so it is
    // a secret: the holder shown (listings, `Locked` errors, log lines)
    // is named by a digest of it, the same for the same grant.
    let id = if token.is_empty() {
        "weppcloud-lock".to_owned()
    } else {
        let digest = crate::weppcloud::sha256_hex(&format!("weppcloud lock\0{token}"));
        format!("weppcloud-{}", &digest[..16])
    };
    let owner = Owner::new(if host.is_empty() { "weppcloud" } else { host }, pid, id)
        .or_else(|_| Owner::new("weppcloud", pid, "weppcloud-lock"))
        .unwrap_or_else(|_| Owner::for_this_process());
    // Whole seconds in WEPPcloud's code; a float is read too.
    let since = parsed
        .get("acquired_at")
        .and_then(serde_json::Value::as_f64)
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .map_or(SystemTime::UNIX_EPOCH, |since| {
            SystemTime::UNIX_EPOCH + since
        });
    LockInfo::new(key.clone(), owner, Fence(0), since, expires_in(pttl))
}

/// A holder's `expires_in` from its key's `PTTL`: the milliseconds left;
/// [`MAX_TTL`](runstate_core::MAX_TTL) for a key without expiry (`-1`: a
/// WEPPcloud lock set without `EX`, say), which ends only when released;
/// zero for a key already gone (`-2`). Zero for a lock that never expires
/// would read as "expiring now", and waiters, which never sleep past a
/// holder's expiry, would retry every millisecond.
pub(crate) fn expires_in(pttl: i64) -> Duration {
    match u64::try_from(pttl) {
        Ok(ms) => Duration::from_millis(ms),
        Err(_) if pttl == -1 => runstate_core::MAX_TTL,
        Err(_) => Duration::ZERO,
    }
}

/// The document an acquire loaded: from the pipelined `HMGET` (`pair`),
/// or from the script's reply when it read the document itself (`load`).
pub(crate) fn loaded_doc(
    pair: Option<Value>,
    load: bool,
    reply: &mut Reply,
) -> Result<Option<StoredDoc>, Error> {
    Ok(match pair {
        Some(pair) => stored_of(pair)?,
        None if load => match (reply.text_opt()?, reply.bytes()?) {
            (Some(version), Some(bytes)) => Some(StoredDoc::new(bytes, Version::new(version))),
            _ => None,
        },
        None => None,
    })
}

/// A document read by `HMGET <doc> version data`: both present, or none.
pub(crate) fn stored_of(pair: Value) -> Result<Option<StoredDoc>, Error> {
    let Value::Array(pair) = pair else {
        return Err(unexpected("loaded document"));
    };
    let mut pair = pair.into_iter();
    Ok(match (pair.next(), pair.next()) {
        (Some(Value::BulkString(version)), Some(Value::BulkString(bytes))) => Some(StoredDoc::new(
            Bytes::from(bytes),
            Version::new(String::from_utf8(version).map_err(|_| unexpected("version"))?),
        )),
        _ => None,
    })
}

/// A document as `get` reads it without a size limit: the reply of
/// `HMGET <doc> version data` (both present, or none), or the error in it.
pub(crate) fn read_hmget(reply: Value) -> Result<Option<StoredDoc>, Error> {
    let reply = reply.extract_error().map_err(map_redis_error)?;
    let (version, data): (Option<String>, Option<Vec<u8>>) =
        redis::from_redis_value(reply).map_err(|e| map_redis_error(e.into()))?;
    Ok(version
        .zip(data)
        .map(|(version, data)| StoredDoc::new(Bytes::from(data), Version::new(version))))
}

/// A document as `get` reads it with a size limit: the limited-read
/// script's reply.
pub(crate) fn read_limited(mut reply: Reply, limit: u64) -> Result<Option<StoredDoc>, Error> {
    match reply.status.as_str() {
        "ok" => {
            let version = reply.text()?;
            let bytes = reply.bytes()?.unwrap_or_default();
            Ok(Some(StoredDoc::new(bytes, Version::new(version))))
        }
        "absent" => Ok(None),
        "toolarge" => Err(too_large(reply.int()?, Some(limit))),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn too_large(size: i64, limit: Option<u64>) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!(
            "document is {size} bytes, over the limit of {}",
            limit.map_or_else(|| "?".to_owned(), |l| l.to_string())
        ),
    )
    .with_backend(BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runstate_core::RunId;

    #[test]
    fn a_key_without_expiry_is_not_expiring_now() {
        assert_eq!(expires_in(1500), Duration::from_millis(1500));
        assert_eq!(expires_in(-1), runstate_core::MAX_TTL);
        assert_eq!(expires_in(-2), Duration::ZERO);
    }

    #[test]
    fn reads_weppcloud_payloads() {
        let key = LockKey::Run(RunId::new("r").unwrap());
        let info = weppcloud_info(
            &key,
            r#"{"token":"0f3a9c","owner":"wepp1.example:4242","acquired_at":1700000000,"expires_at":1700021600,"ttl":21600}"#,
            5000,
        );
        assert_eq!(info.owner.host(), "wepp1.example");
        assert_eq!(info.owner.pid(), 4242);
        // Named by a digest of the token, which is WEPPcloud's proof of
        // holding the lock and never shown (it was the id itself).
        let id = info.owner.id().to_owned();
        assert!(id.starts_with("weppcloud-") && id.len() == 26, "{id}");
        assert!(!id.contains("0f3a9c"), "{id}");
        assert_eq!(info.expires_in, Duration::from_secs(5));
        let again = weppcloud_info(
            &key,
            r#"{"token":"0f3a9c","owner":"wepp1.example:4242"}"#,
            5000,
        );
        assert_eq!(again.owner.id(), id, "the same grant, the same holder");
        let legacy = weppcloud_info(&key, "abcdef0123", -1);
        assert!(
            !legacy.owner.id().contains("abcdef0123"),
            "{}",
            legacy.owner
        );
        assert_ne!(legacy.owner.id(), id);
        // A legacy lock without expiry ends only when released.
        assert_eq!(legacy.expires_in, runstate_core::MAX_TTL);
    }
}
