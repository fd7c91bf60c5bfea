//! Document writes: a `put`, a save under a lease, a save-and-release and
//! each write of a batch are one `MULTI`/`EXEC` of the same commands (the
//! document staged by `HSET`, then the write script), built by
//! [`Inner::write_commands`] and read by [`Inner::write_outcome`].

use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

use redis::Value;
use runstate_core::{
    Bytes, DocName, Error, ErrorKind, Lease, LockKey, Operation, PutMode, Result, RunId, Version,
};

use crate::batch::exec_outcome;
use crate::errors::unexpected;
use crate::reply::Reply;
use crate::{BACKEND, Inner};

impl Inner {
    /// A write, and with `release` the save-and-release of `lease`: when
    /// the save fails and its script did not answer (so did not release),
    /// the lease is released here, unless it was fenced or lost. `foreign`
    /// is a lease granted by another lock service, checked against (and
    /// raising) its lock's watermark.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: &Bytes,
        mode: &PutMode,
        lease: Option<&Lease>,
        foreign: Option<&Lease>,
        release: bool,
    ) -> Result<Version> {
        let write = Write {
            run,
            doc,
            bytes,
            mode,
            lease,
            foreign,
            release,
            version: new_version(),
        };
        let mut answered = false;
        // Over what one Redis value holds: refused before sending (the
        // closed connection would reach the caller as a retryable network
        // error).
        let outcome = if crate::over_a_value(bytes.len()) {
            Err(crate::reply::too_large(
                i64::try_from(bytes.len()).unwrap_or(i64::MAX),
                Some(crate::MAX_DOCUMENT),
            ))
        } else {
            self.put_once(&write, &mut answered).await
        };
        if let (Err(error), Some(lease), true, false) = (&outcome, lease, release, answered)
            && !error.is_lease_lost()
        {
            self.release_after_failure(lease, error).await;
        }
        outcome
    }

    /// One write; sets `answered` once the script's reply arrived (every
    /// reply of the save script means it handled the lease itself).
    pub(crate) async fn put_once(&self, write: &Write<'_>, answered: &mut bool) -> Result<Version> {
        for lease in write.lease.iter().chain(write.foreign.iter()) {
            lease.key().check_covers(write.run, write.doc)?;
        }
        let mut pipe = redis::pipe();
        if self.config.wait_replicas > 0 {
            // The transaction spelled out, so that the WAIT rides in the
            // same request, right after its EXEC (see `send_then_wait`).
            pipe.cmd("MULTI");
            let script = self.write_commands(&mut pipe, write);
            pipe.cmd("EXEC");
            let (mut replies, acked) = self.send_then_wait(pipe, script).await?;
            let exec = replies.pop().ok_or_else(|| unexpected("no reply"))?;
            // The MULTI's reply first, then the queued commands'.
            let queued = replies.get(1..).unwrap_or_default();
            let reply =
                exec_outcome(exec, queued, true).unwrap_or_else(|| Err(unexpected("no reply")))?;
            *answered = true;
            self.write_outcome(write, reply)?;
            self.replicated(Some(&acked))?;
            return Ok(write.version.clone());
        }
        pipe.atomic();
        let script = self.write_commands(&mut pipe, write);
        // The key to send it again by, on a cluster only (see `transact`).
        let route = self
            .conn
            .is_cluster()
            .then(|| self.keys.doc(write.run, write.doc));
        let replies = self.transact(&pipe, script, route.as_deref()).await?;
        let reply = replies
            .into_iter()
            .next()
            .ok_or_else(|| unexpected("no reply"))?;
        *answered = true;
        self.write_outcome(write, reply)?;
        Ok(write.version.clone())
    }

    /// Appends the commands of one write to `pipe`, which the caller runs
    /// as one MULTI/EXEC, and returns the script among them. Only the
    /// script's reply is not ignored. [`Inner::put_once`] and the batches
    /// both build their writes here, so a write in a batch is exactly the
    /// write `put` makes.
    pub(crate) fn write_commands<'s>(
        &'s self,
        pipe: &mut redis::Pipeline,
        write: &Write<'_>,
    ) -> &'s redis::Script {
        let Write {
            run,
            doc,
            bytes,
            mode,
            lease,
            foreign,
            release,
            ref version,
        } = *write;
        let (mode_arg, expected) = match mode {
            PutMode::Overwrite => ("o", ""),
            PutMode::Create => ("c", ""),
            PutMode::Update(version) => ("u", version.as_str()),
        };
        let doc_key = self.keys.doc(run, doc);
        let events = self.keys.events(run);
        // Every write, a plain overwrite too, goes through a script: only
        // a script can index and announce a write after it was placed, so
        // a write the server refuses (WRONGTYPE on a document key that is
        // not a document) indexes and announces nothing. (Plain `HSET`,
        // `ZADD`, `PUBLISH` in one MULTI/EXEC saved about 5 µs of server
        // time, but Redis runs the rest of a transaction after a failed
        // command.)
        let script = match lease {
            None => &self.scripts.put,
            Some(_) => &self.scripts.save,
        };
        let staging = self.keys.staging(run);
        let docs = self.keys.docs(run);
        // The document is staged by a plain HSET in the same transaction;
        // the script renames it into place only if every check passes.
        // The staging key is dropped first, whatever another client left
        // there (a string would make this `HSET` fail while the script
        // still renamed the string over the document; stray fields of a
        // hash would ride along into it).
        pipe.cmd("DEL").arg(&staging).ignore();
        pipe.cmd("HSET")
            .arg(&staging)
            .arg("version")
            .arg(version.as_str())
            .arg("data")
            .arg(bytes.as_ref())
            .ignore();
        // The EVALSHA is written straight into the pipeline (a
        // `ScriptInvocation` would collect every key and argument once more
        // and copy them again); a NOSCRIPT reply is handled by the caller
        // (`transact`, or the batch), which loads `script` and sends again.
        let evalsha = pipe
            .cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(if lease.is_some() { 6 } else { 5 })
            .arg(&doc_key)
            .arg(&docs);
        if self.conn.is_cluster() {
            // A cluster keeps no store-wide run index (see `runs_key`).
            evalsha.arg(&docs);
        } else {
            evalsha.arg(self.keys.runs());
        }
        evalsha.arg(&staging);
        match foreign {
            Some(foreign) => evalsha.arg(self.keys.watermark(foreign.key())),
            // Not read without a foreign fence; any key of the run's slot.
            None => evalsha.arg(&docs),
        };
        if let Some(lease) = lease {
            evalsha.arg(self.keys.lock(lease.key()));
        }
        evalsha
            .arg(doc.as_str())
            .arg(run.as_str())
            .arg(mode_arg)
            .arg(expected)
            .arg(version.as_str())
            .arg(&events)
            .arg(foreign.map_or_else(String::new, |f| f.fence().to_string()));
        if let Some(lease) = lease {
            evalsha
                .arg(lease.owner().id())
                .arg(lease.fence().to_string())
                .arg(if release { "1" } else { "0" })
                .arg(lease.key().doc().map_or("", DocName::as_str));
        }
        script
    }

    /// What the reply of a write's script means: written (`Ok`), or the
    /// error of a refused or failed write.
    pub(crate) fn write_outcome(&self, write: &Write<'_>, reply: Value) -> Result<()> {
        let Write {
            run,
            doc,
            mode,
            lease,
            foreign,
            release,
            ..
        } = *write;
        let mut reply = Reply::parse(reply)?;
        match reply.status.as_str() {
            // `applied`: this write, sent again by the cluster client after
            // its connection dropped, had been placed by the first send.
            "ok" | "applied" => Ok(()),
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
                let holder = reply.maybe_holder(lease.key())?;
                Err(Error::fenced(lease, holder).with_backend(BACKEND))
            }
            "watermark" => {
                let Some(foreign) = foreign else {
                    return Err(unexpected("watermark without a foreign lease"));
                };
                Err(Self::below_watermark(
                    foreign.key(),
                    foreign.fence(),
                    &reply.text()?,
                ))
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
            // A command of the write failed (WRONGTYPE on a document key
            // that is not a document, say): nothing was written.
            "failed" => Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "redis refused the write; nothing was written: {}",
                    reply.text()?
                ),
            )
            .with_backend(BACKEND)),
            other => Err(unexpected(other)),
        }
    }
}

/// One write, as [`Inner::write_commands`] sends it and
/// [`Inner::write_outcome`] reads its reply: a `put`, a save (with
/// `lease`), a save-and-release (`release`) or one write of a batch.
pub(crate) struct Write<'a> {
    pub(crate) run: &'a RunId,
    pub(crate) doc: &'a DocName,
    pub(crate) bytes: &'a Bytes,
    pub(crate) mode: &'a PutMode,
    /// A lease of this store the write is fenced by.
    pub(crate) lease: Option<&'a Lease>,
    /// A lease granted by another lock service (checked against its
    /// lock's watermark).
    pub(crate) foreign: Option<&'a Lease>,
    /// Release `lease` with the write (save-and-release).
    pub(crate) release: bool,
    /// The version the write gives the document.
    pub(crate) version: Version,
}

/// A new version token: 128 bits in hex, unique to one write (see below).
/// Versions are compared only for equality, so they need to be unique, not
/// ordered.
pub(crate) fn new_version() -> Version {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// Versions made by this process so far.
    static MADE: AtomicU32 = AtomicU32::new(0);
    // 64 random bits (fastrand keeps 64 bits of state per thread, copied
    // by a fork), then this process's id and its count of versions: on one
    // host no two writes share a version, a forked child included, and
    // across hosts the random half tells them apart. A write sent again
    // is recognised by its version (`applied`), so a repeat would report
    // a write that was not made.
    let bits = (u128::from(fastrand::u64(..)) << 64)
        | (u128::from(std::process::id()) << 32)
        | u128::from(MADE.fetch_add(1, AtomicOrdering::Relaxed));
    // Digit by digit rather than through `format!`, which costs several
    // times more on every write.
    let text: String = (0..32)
        .rev()
        .map(|digit| char::from(HEX[((bits >> (digit * 4)) & 0xf) as usize]))
        .collect();
    Version::new(text)
}
