//! Native batches: [`Store::get_many`](runstate_core::Store::get_many) and
//! [`Store::put_many`](runstate_core::Store::put_many) as pipelines, one
//! round trip for up to [`BATCH_DOCS`] documents instead of one per
//! document.
//!
//! Every key of a batch carries its run's hash tag, so on a cluster a
//! whole batch is in one slot and its pipeline goes to that slot's
//! primary, as a single call does.
//!
//! - A read is the command [`get`](runstate_core::Store::get) sends: an
//!   `HMGET`, or with a size limit the limited-read script.
//! - A write is the transaction [`put`](runstate_core::Store::put) sends
//!   (see [`Inner::write_commands`]), each in its own `MULTI`/`EXEC` in
//!   the one pipeline: every document is all or nothing and conditional on
//!   its own mode, its change announced by its own script or transaction,
//!   and a refused write does not stop the others. The batch as a whole is
//!   not one transaction, so a long batch does not hold the server.
//! - A script the server has forgotten (`NOSCRIPT`, after a restart or a
//!   `SCRIPT FLUSH`) is loaded again and only the documents it refused are
//!   sent again (their writes were never made; the others' were). Writes of
//!   one document go in waves, the `n`-th write of each document in wave
//!   `n`, each wave after the previous one, so that such a retry can never
//!   reorder two writes of a document: a batch that writes each document
//!   once is one wave.
//! - With `wait_replicas`, a `WAIT` ends each pipeline (no extra round
//!   trip) and judges all its writes, as the one after a single write does.
//!
//! Each document's result is what the single call would give, errors
//! mapped the same way. Failures of the whole pipeline (a lost connection,
//! a timeout) fail the whole batch.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Pipeline, Script, ServerError, ServerErrorKind, Value};
use runstate_core::batch::{groups, settle, waves};
use runstate_core::{
    DocName, GetOptions, Operation, PutRequest, Result, RunId, StoredDoc, Version,
};

use crate::Inner;
use crate::errors::{map_redis_error, unexpected, until};
use crate::reply::{Reply, read_hmget, read_limited};
use crate::writes::{Write, new_version};

/// Documents per pipeline of a batch (each pipeline is one round trip
/// under the configured timeout).
pub(crate) const BATCH_DOCS: usize = 256;

/// About this many bytes of documents per pipeline of a `put_many` (a
/// larger document goes alone).
pub(crate) const BATCH_BYTES: u64 = 16 << 20;

impl Inner {
    /// Reads `docs` of `run`, [`BATCH_DOCS`] per pipeline: one result per
    /// name, in order, each as [`get`](runstate_core::Store::get) gives it.
    pub(crate) async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let mut out = Vec::with_capacity(docs.len());
        for chunk in docs.chunks(BATCH_DOCS) {
            out.extend(self.get_chunk(run, chunk, options).await?);
        }
        Ok(out)
    }

    /// One pipeline of reads (and, after `NOSCRIPT`, one more of the reads
    /// it refused).
    async fn get_chunk(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        let script = &self.scripts.get_limited;
        let bound = self.config.timeout;
        let deadline = tokio::time::Instant::now() + bound;
        let mut outcomes: Vec<Option<Result<Option<StoredDoc>>>> =
            docs.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..docs.len()).collect();
        let mut reloaded = false;
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &pending {
                let key = self.keys.doc(run, &docs[i]);
                match options.limit {
                    None => {
                        pipe.cmd("HMGET").arg(key).arg("version").arg("data");
                    }
                    Some(limit) => {
                        let mut invocation = script.prepare_invoke();
                        invocation.key(key).arg(limit);
                        pipe.invoke_script(&invocation);
                    }
                }
            }
            let replies = self.send_raw(&pipe, deadline, bound).await?;
            let mut again = Vec::new();
            for (&i, reply) in pending.iter().zip(replies) {
                if !reloaded && is_noscript(&reply) {
                    again.push(i);
                    continue;
                }
                let outcome = match options.limit {
                    None => read_hmget(reply),
                    Some(limit) => reply
                        .extract_error()
                        .map_err(map_redis_error)
                        .and_then(Reply::parse)
                        .and_then(|reply| read_limited(reply, limit)),
                };
                outcomes[i] = Some(outcome);
            }
            if !again.is_empty() {
                self.reload(script, deadline, bound).await?;
                reloaded = true;
            }
            pending = again;
        }
        Ok(settle(outcomes, docs, Operation::Get, run, || {
            unexpected("a batched read was not made")
        }))
    }

    /// Writes `puts` to `run`: in waves (the `n`-th write of each document
    /// in wave `n`), each wave in pipelines of up to [`BATCH_DOCS`] writes
    /// and about [`BATCH_BYTES`]; one result per write, in order, each as
    /// [`put`](runstate_core::Store::put) gives it.
    ///
    /// On a cluster, one write at a time instead: redis-rs's cluster client
    /// sends a whole pipeline again when any reply in it is a redirect
    /// (`MOVED`, `ASK`, `TRYAGAIN`, …, as during a slot migration), and the
    /// writes of a batch pipeline are separate transactions, some of which
    /// may have committed. A write sent again that finds its own version in
    /// place answers `applied`, but an overwrite sent again after another
    /// client's write would be made again and bring the older bytes back.
    /// A single write is one transaction, which a redirect aborts whole
    /// (nothing of it run): safe to send again.
    pub(crate) async fn put_many(
        &self,
        run: &RunId,
        puts: &[PutRequest],
    ) -> Result<Vec<Result<Version>>> {
        // A document over what one value holds is refused by `put` before
        // anything is sent; a batch holding one goes one write at a time.
        let oversize = puts.iter().any(|put| crate::over_a_value(put.bytes.len()));
        if self.conn.is_cluster() || oversize {
            let mut results = Vec::with_capacity(puts.len());
            for put in puts {
                results.push(
                    self.put(run, &put.doc, &put.bytes, &put.mode, None, None, false)
                        .await
                        .map_err(|e| e.at_doc(Operation::Put, run, &put.doc)),
                );
            }
            return Ok(results);
        }
        let mut results: Vec<Option<Result<Version>>> = puts.iter().map(|_| None).collect();
        for wave in waves(puts, 0..puts.len()) {
            for group in groups(puts, &wave, BATCH_DOCS, BATCH_BYTES) {
                self.put_group(run, puts, group, &mut results).await?;
            }
        }
        Ok(settle(
            results,
            puts.iter().map(|put| &put.doc),
            Operation::Put,
            run,
            || unexpected("a batched write was not made"),
        ))
    }

    /// One pipeline of writes (each its own MULTI/EXEC), then, after
    /// `NOSCRIPT`, one more of the writes it refused; sets the results of
    /// `group`.
    async fn put_group(
        &self,
        run: &RunId,
        puts: &[PutRequest],
        group: &[usize],
        results: &mut [Option<Result<Version>>],
    ) -> Result<()> {
        let writes: Vec<Write<'_>> = group
            .iter()
            .map(|&i| Write {
                run,
                doc: &puts[i].doc,
                bytes: &puts[i].bytes,
                mode: &puts[i].mode,
                lease: None,
                foreign: None,
                release: false,
                version: new_version(),
            })
            .collect();
        let wait = self.config.wait_replicas;
        let bound = if wait > 0 {
            self.config.timeout + self.config.wait_timeout
        } else {
            self.config.timeout
        };
        let deadline = tokio::time::Instant::now() + bound;
        let mut pending: Vec<usize> = (0..writes.len()).collect();
        let mut reloaded = false;
        while !pending.is_empty() {
            let mut pipe = redis::pipe();
            // Per write: where its MULTI's and its EXEC's replies are.
            let mut execs = Vec::with_capacity(pending.len());
            for &k in &pending {
                let multi = pipe.len();
                pipe.cmd("MULTI");
                self.write_commands(&mut pipe, &writes[k]);
                pipe.cmd("EXEC");
                execs.push((multi, pipe.len() - 1));
            }
            if wait > 0 {
                pipe.cmd("WAIT")
                    .arg(wait)
                    .arg(u64::try_from(self.config.wait_timeout.as_millis()).unwrap_or(u64::MAX));
            }
            let mut replies = self.send_raw(&pipe, deadline, bound).await?;
            let acked = if wait > 0 { replies.pop() } else { None };
            let mut again = Vec::new();
            for (&k, &(multi, at)) in pending.iter().zip(&execs) {
                let exec = std::mem::replace(&mut replies[at], Value::Nil);
                let write = &writes[k];
                let outcome = match exec_outcome(exec, &replies[multi + 1..at], reloaded) {
                    None => {
                        again.push(k);
                        continue;
                    }
                    Some(Ok(reply)) => self.write_outcome(write, reply),
                    Some(Err(error)) => Err(error),
                };
                results[group[k]] = Some(outcome.and_then(|()| {
                    self.replicated(acked.as_ref())?;
                    Ok(write.version.clone())
                }));
            }
            if !again.is_empty() {
                self.reload(&self.scripts.put, deadline, bound).await?;
                reloaded = true;
            }
            pending = again;
        }
        Ok(())
    }

    /// Sends `pipe` as it is (no MULTI around it, the caller's own
    /// MULTI/EXEC inside) and returns every command's reply, server errors
    /// included as values, by `deadline` (`bound` after the batch began).
    async fn send_raw(
        &self,
        pipe: &Pipeline,
        deadline: tokio::time::Instant,
        bound: Duration,
    ) -> Result<Vec<Value>> {
        let mut con = self.conn.clone();
        let replies = until(
            deadline,
            bound,
            con.req_packed_commands(pipe, 0, pipe.len()),
        )
        .await?;
        if replies.len() != pipe.len() {
            return Err(unexpected("pipelined replies"));
        }
        Ok(replies)
    }

    /// Loads `script` again after the server answered `NOSCRIPT`.
    async fn reload(
        &self,
        script: &Script,
        deadline: tokio::time::Instant,
        bound: Duration,
    ) -> Result<()> {
        let mut con = self.conn.clone();
        until(deadline, bound, script.load_async(&mut con)).await?;
        Ok(())
    }
}

/// Whether a reply, or a reply inside an `EXEC`'s, is the server's
/// `NOSCRIPT`.
pub(crate) fn is_noscript(reply: &Value) -> bool {
    match reply {
        Value::ServerError(error) => noscript(error),
        Value::Array(items) => items.iter().any(is_noscript),
        _ => false,
    }
}

fn noscript(error: &ServerError) -> bool {
    error.kind() == Some(ServerErrorKind::NoScript)
}

/// The first server error among `replies` (a pipeline's, or a
/// transaction's), if any.
pub(crate) fn first_server_error(replies: &[Value]) -> Option<ServerError> {
    replies.iter().find_map(|reply| match reply {
        Value::ServerError(error) => Some(error.clone()),
        _ => None,
    })
}

/// What one write's `EXEC` answered: `None` when its script was unknown
/// to the server (`NOSCRIPT`, and not yet reloaded: nothing was written,
/// send it again); otherwise the script's reply (for
/// [`Inner::write_outcome`]), or the
/// error the single write's transaction would fail with (the first
/// command error in it, or, for a transaction the server refused as it
/// was queued (`EXECABORT`), the first refusal among `queued`, the
/// replies between its `MULTI` and `EXEC`: a server still loading or a
/// replica that became read-only stays retryable, as in
/// [`Inner::transact`]), mapped as there.
pub(crate) fn exec_outcome(exec: Value, queued: &[Value], reloaded: bool) -> Option<Result<Value>> {
    let mut items = match exec {
        Value::Array(items) => items,
        Value::ServerError(error) => {
            let refusal = first_server_error(queued).unwrap_or(error);
            return Some(Err(map_redis_error(refusal.into())));
        }
        _ => return Some(Err(unexpected("transaction reply"))),
    };
    if let Some(error) = first_server_error(&items) {
        if !reloaded && noscript(&error) {
            return None;
        }
        return Some(Err(map_redis_error(error.into())));
    }
    // The script's reply is the last of its transaction (after the DEL and
    // HSET that staged the bytes).
    Some(items.pop().ok_or_else(|| unexpected("no reply")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(resp: &[u8]) -> Value {
        redis::parse_redis_value(resp).expect("a reply")
    }

    /// A transaction the server refused as it was queued reports the
    /// refusal itself: a server still loading stays retryable (before,
    /// with `wait_replicas`, the bare `EXECABORT` was a permanent error).
    #[test]
    fn an_aborted_transaction_reports_its_refusal() {
        let exec = reply(b"-EXECABORT Transaction discarded because of previous errors.\r\n");
        let queued = [
            reply(b"-LOADING Redis is loading the dataset in memory\r\n"),
            reply(b"+QUEUED\r\n"),
        ];
        let error = match exec_outcome(exec.clone(), &queued, true) {
            Some(Err(error)) => error,
            other => panic!("not an error: {other:?}"),
        };
        assert!(error.is_retryable(), "{error}");
        let denied = [reply(b"-NOPERM this user has no permissions\r\n")];
        let error = match exec_outcome(exec, &denied, true) {
            Some(Err(error)) => error,
            other => panic!("not an error: {other:?}"),
        };
        assert_eq!(error.kind(), runstate_core::ErrorKind::Denied, "{error}");
    }
}
