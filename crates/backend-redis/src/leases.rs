//! Leases: grants (an acquire-and-load reads the document in the same
//! round trip), renewals and releases through the lease scripts, the
//! errors of a busy or refused lock, and the listings of held locks.

use std::time::{Duration, Instant};

use redis::Value;
use runstate_core::time::from_unix_millis;
use runstate_core::{
    DocName, Error, ErrorKind, Fence, GetOptions, Lease, LockInfo, LockKey, Operation, Owner,
    Result, RunId, StoredDoc, check_ttl,
};

use crate::batch::first_server_error;
use crate::errors::{map_redis_error, unexpected};
use crate::reply::{Reply, loaded_doc, too_large};
use crate::{BACKEND, HOLDER_BATCH, Inner};

impl Inner {
    /// Checks a TTL ([`check_ttl`], before anything is sent) and gives it
    /// in whole milliseconds, rounded up so the server never expires a
    /// lease before its holder's local deadline.
    pub(crate) fn ttl_ms(key: &LockKey, ttl: Duration, op: Operation) -> Result<u64> {
        check_ttl(ttl).map_err(|e| e.with_backend(BACKEND).with_operation(op).with_lock(key))?;
        let ms = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
        // check_ttl bounds it by MAX_TTL, 86.4 million ms.
        u64::try_from(ms).map_err(|_| unexpected("ttl"))
    }

    /// The error of a TTL a script refused (the client checks first, so
    /// only a script out of step with the client gets here).
    fn bad_ttl(key: &LockKey, op: Operation) -> Error {
        Error::new(
            ErrorKind::InvalidArgument,
            "redis refused the lease TTL; nothing was written",
        )
        .with_backend(BACKEND)
        .with_operation(op)
        .with_lock(key)
    }

    /// Releases `lease` after a failed save whose script never answered,
    /// so never released it: best effort, since the lease expires by its
    /// TTL anyway. The release checks owner id and fence, so it can never
    /// release a later grant, and is harmless if the save did run.
    pub(crate) async fn release_after_failure(&self, lease: &Lease, failure: &Error) {
        if let Err(release) = self.lease_call(lease, None, Operation::Release).await {
            tracing::debug!(%release, %failure, lock = %lease.key(), "release after a failed save");
        }
    }

    /// Releases the grant of `key` if `owner` holds it, after an acquire
    /// whose reply was an error although its script may have granted:
    /// best effort (the grant expires by its TTL anyway), and only ever
    /// this owner's grant, by its fence.
    async fn release_ours(
        &self,
        key: &LockKey,
        owner: &Owner,
        ttl: Duration,
        issued: Instant,
        failure: &Error,
    ) {
        let mut invocation = self.scripts.inspect.prepare_invoke();
        invocation.key(self.keys.lock(key));
        let holder = match self.invoke(&invocation).await {
            Ok(mut reply) if reply.status == "ok" => reply.holder(key).ok(),
            _ => None,
        };
        if let Some(holder) = holder.filter(|h| h.owner.id() == owner.id()) {
            let lease = Lease::new(
                key.clone(),
                owner.clone(),
                holder.fence,
                ttl,
                issued,
                holder.since,
            );
            self.release_unowned(&lease, failure).await;
        }
    }

    /// Releases a grant the caller never got (its acquire failed after
    /// granting): best effort, since it expires by its TTL anyway; this
    /// process's waiters are told as [`Waits::settled`](crate::listener::Waits::settled) says.
    async fn release_unowned(&self, lease: &Lease, failure: &Error) {
        self.waits.releasing(lease.key(), lease.fence());
        let outcome = self.lease_call(lease, None, Operation::Release).await;
        if let Err(release) = &outcome {
            tracing::debug!(%release, %failure, lock = %lease.key(), "release after a failed load");
        }
        self.waits.settled(lease.key(), lease.fence(), &outcome);
    }

    fn locked(key: &LockKey, holder: LockInfo, op: Operation) -> Error {
        Error::new(ErrorKind::Locked, "the lock is held")
            .with_backend(BACKEND)
            .with_operation(op)
            .with_lock(key)
            .with_holder(holder)
    }

    pub(crate) fn weppcloud_locked(key: &LockKey, reply: &mut Reply, op: Operation) -> Error {
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

    /// The error of a fence below its lock's watermark: a newer grant of
    /// the other lock service has been seen here. `watermark` is the
    /// script's reply: the claimed fence, in decimal.
    pub(crate) fn below_watermark(key: &LockKey, fence: Fence, watermark: &str) -> Error {
        let claimed = watermark.parse().ok().map(Fence);
        Error::below_watermark(key, fence, claimed).with_backend(BACKEND)
    }

    /// The held locks of one run: one script over the run's index.
    pub(crate) async fn run_locks(&self, run: &RunId) -> Result<Vec<LockInfo>> {
        let mut invocation = self.scripts.list_locks.prepare_invoke();
        invocation.key(self.keys.locks(run));
        let mut reply = self.invoke(&invocation).await?;
        let mut found = Vec::new();
        while reply.has_more() {
            let lock_key = reply.text()?;
            let key = self
                .keys
                .parse_lock(run, &lock_key)
                .ok_or_else(|| unexpected("lock key"))?;
            found.push(reply.holder(&key)?);
        }
        Ok(found)
    }

    /// Every held lock under the prefix, without a store-wide index: `SCAN`
    /// for lock keys ([`SCAN_COUNT`](crate::SCAN_COUNT) per call), then the holders, read by
    /// the inspect script pipelined [`HOLDER_BATCH`] keys per round trip.
    /// Each script touches one lock key, so nothing spans runs. A lock that
    /// expires between the two steps reads as free and is left out.
    pub(crate) async fn all_locks(&self) -> Result<Vec<LockInfo>> {
        let pattern = self.keys.lock_pattern();
        let mut seen = std::collections::HashSet::new();
        let mut keys: Vec<(String, LockKey)> = Vec::new();
        // SCAN may return a key twice; the pattern also matches each run's
        // `locks` index, which does not parse as a lock.
        for name in self.scan(&pattern).await? {
            if let Some(key) = self.keys.parse_any_lock(&name)
                && seen.insert(name.clone())
            {
                keys.push((name, key));
            }
        }
        let mut locks = Vec::with_capacity(keys.len());
        // A cluster refuses a pipeline spanning slots: one call per lock
        // there (each lock is in its own run's slot).
        let batch = if self.conn.is_cluster() {
            1
        } else {
            HOLDER_BATCH
        };
        for chunk in keys.chunks(batch) {
            let mut pipe = redis::pipe();
            for (name, _) in chunk {
                let mut invocation = self.scripts.inspect.prepare_invoke();
                invocation.key(name);
                pipe.invoke_script(&invocation);
            }
            let replies = self.transact(&pipe, &self.scripts.inspect, None).await?;
            if replies.len() != chunk.len() {
                return Err(unexpected("pipelined replies"));
            }
            for ((_, key), value) in chunk.iter().zip(replies) {
                let mut reply = Reply::parse(value)?;
                match reply.status.as_str() {
                    "ok" => locks.push(reply.holder(key)?),
                    "free" => {}
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok(locks)
    }

    /// A pipeline of `script` (maybe a read behind it: a grant, a claim)
    /// with the `WAIT` behind it in one request ([`Inner::send_then_wait`]):
    /// the replies and the `WAIT`'s, the first server error among the
    /// replies as the error [`Inner::transact`] would give.
    pub(crate) async fn script_then_wait(
        &self,
        pipe: redis::Pipeline,
        script: &redis::Script,
    ) -> Result<(Vec<Value>, Value)> {
        let (replies, acked) = self.send_then_wait(pipe, script).await?;
        if let Some(error) = first_server_error(&replies) {
            return Err(map_redis_error(error.into()));
        }
        Ok((replies, acked))
    }

    /// `invocation` of `script` alone, with the `WAIT` behind it
    /// ([`Inner::script_then_wait`]): its reply and the `WAIT`'s.
    pub(crate) async fn invoke_then_wait(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        script: &redis::Script,
    ) -> Result<(Reply, Value)> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation);
        let (replies, acked) = self.script_then_wait(pipe, script).await?;
        let first = replies
            .into_iter()
            .next()
            .ok_or_else(|| unexpected("no reply"))?;
        Ok((Reply::parse(first)?, acked))
    }

    /// Acquire (and optionally load `doc`) in one script.
    pub(crate) async fn acquire(
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
        // With `wait_replicas`, the grant and its WAIT go in one request
        // (see `send_then_wait`): `acked` is the WAIT's reply.
        let mut acked = None;
        let (mut reply, mut loaded) = match load {
            Some((doc, options)) if options.limit.is_none() => {
                let mut pipe = redis::pipe();
                pipe.invoke_script(&invocation)
                    .cmd("HMGET")
                    .arg(self.keys.doc(run, doc))
                    .arg("version")
                    .arg("data");
                let sent = if self.config.wait_replicas > 0 {
                    self.script_then_wait(pipe, &self.scripts.acquire)
                        .await
                        .map(|(replies, wait)| {
                            acked = Some(wait);
                            replies
                        })
                } else {
                    self.transact(&pipe, &self.scripts.acquire, None).await
                };
                let replies = match sent {
                    Ok(replies) => replies,
                    Err(error) => {
                        // The script may have granted before the read
                        // failed (a document key of another type): that
                        // grant is nobody's, so it goes. A lost reply is
                        // left to the owner's retry, which gets it back.
                        if !error.is_retryable() {
                            self.release_ours(key, owner, ttl, issued, &error).await;
                        }
                        return Err(error);
                    }
                };
                let mut replies = replies.into_iter();
                let (Some(first), Some(second)) = (replies.next(), replies.next()) else {
                    return Err(unexpected("transaction replies"));
                };
                (Reply::parse(first)?, Some(second))
            }
            _ if self.config.wait_replicas > 0 => {
                let (reply, wait) = self
                    .invoke_then_wait(&invocation, &self.scripts.acquire)
                    .await?;
                acked = Some(wait);
                (reply, None)
            }
            _ => (self.invoke(&invocation).await?, None),
        };
        match reply.status.as_str() {
            "ok" => {
                let fence: u64 = reply.text()?.parse().map_err(|_| unexpected("fence"))?;
                // The grant's time by the server's clock: for a grant handed
                // back to its owner, the time it was first made.
                let since: u64 = reply.text()?.parse().map_err(|_| unexpected("since"))?;
                let lease = Lease::new(
                    key.clone(),
                    owner.clone(),
                    Fence(fence),
                    ttl,
                    issued,
                    from_unix_millis(since),
                );
                let stored = match loaded_doc(loaded.take(), load.is_some(), &mut reply) {
                    Ok(stored) => stored,
                    Err(error) => {
                        // Granted, but the document is unreadable: the
                        // caller gets no lease, so nobody would release it.
                        self.release_unowned(&lease, &error).await;
                        return Err(error);
                    }
                };
                // A grant lost in a failover could be granted again to
                // someone else; with `wait_replicas` it is not reported
                // until replicas have it (a retry by the same owner gets
                // this grant back).
                self.replicated(acked.as_ref())?;
                Ok((lease, stored))
            }
            "locked" => {
                let holder = reply.holder(key)?;
                // What this process's waiters compare release announcements
                // with (see `wait_for_release`).
                self.waits.blocked(key, holder.fence);
                Err(Self::locked(key, holder, op))
            }
            "foreign" => {
                // A WEPPcloud lock announces no release: its waiters back off.
                self.waits.blocked(key, Fence(0));
                Err(Self::weppcloud_locked(key, &mut reply, op))
            }
            "toolarge" => Err(too_large(reply.int()?, load.and_then(|(_, o)| o.limit))),
            "badttl" => Err(Self::bad_ttl(key, op)),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn lease_call(
        &self,
        lease: &Lease,
        ttl: Option<u64>,
        op: Operation,
    ) -> Result<()> {
        let key = lease.key();
        let mut invocation = match ttl {
            Some(_) => self.scripts.renew.prepare_invoke(),
            None => self.scripts.release.prepare_invoke(),
        };
        invocation.key(self.keys.lock(key));
        invocation
            .arg(lease.owner().id())
            .arg(lease.fence().to_string());
        match ttl {
            Some(ms) => invocation.arg(ms),
            // A release is announced for waiters anywhere.
            None => invocation
                .arg(self.keys.events(key.run()))
                .arg(key.doc().map_or("", DocName::as_str)),
        };
        let mut reply = self.invoke(&invocation).await?;
        match reply.status.as_str() {
            "ok" => Ok(()),
            "badttl" => Err(Self::bad_ttl(key, op)),
            "lost" => {
                let holder = reply.maybe_holder(key)?;
                Err(Error::lease_lost(lease, holder)
                    .with_backend(BACKEND)
                    .with_operation(op))
            }
            other => Err(unexpected(other)),
        }
    }
}
