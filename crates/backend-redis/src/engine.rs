//! The store's round trips: every request under the store's timeout
//! ([`Inner::bounded`]), one script ([`Inner::invoke`]) or a pipeline
//! holding one ([`Inner::transact`]: a script the server forgot is loaded
//! again, a write transaction a cluster node refused for its layout is
//! sent again); the pub/sub listener, started on first use; where the run
//! index lives; keys across every primary of a cluster; and the `WAIT`
//! for replicas in the request of every save and grant.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ScriptInvocation, Value};
use runstate_core::{Error, ErrorKind, ListPage, Result, RunId};

use crate::batch::is_noscript;
use crate::conn::{Conn, Reach};
use crate::errors::{self, unexpected, until, within};
use crate::listener::Listener;
use crate::reply::Reply;
use crate::{BACKEND, Inner};

impl Inner {
    /// The store's listener, started on first use.
    pub(crate) fn listener(&self) -> Arc<Listener> {
        Arc::clone(self.listener.get_or_init(|| {
            Arc::new(Listener::start(
                self.clients.clone(),
                self.config.connect_timeout,
                self.config.timeout,
                Arc::clone(&self.waits),
            ))
        }))
    }

    /// Runs a request under the configured bound.
    pub(crate) async fn bounded<T>(
        &self,
        request: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        within(self.config.timeout, request).await
    }

    pub(crate) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Reply> {
        let mut con = self.conn.clone();
        let value: Value = self.bounded(invocation.invoke_async(&mut con)).await?;
        Reply::parse(value)
    }

    /// Runs a pipeline (usually MULTI/EXEC) holding `script`, reloading the script and
    /// running the transaction again if the server had forgotten it (after
    /// a restart or `SCRIPT FLUSH`; the staged bytes of the failed attempt
    /// are simply staged again). Returns the replies of the commands that
    /// were not ignored.
    ///
    /// `resend` is the key of a `MULTI`/`EXEC` that may be sent again (a
    /// write: a write sent again finds its own version in place and
    /// answers `applied`), given on a cluster only (only a cluster node
    /// aborts a transaction for the layout). Such a transaction, when a
    /// node aborted it without running any of it for the cluster's layout
    /// ([`errors::transaction_not_run`]: sent to a node that does not
    /// serve the slot, as the cluster client does when it sends a request
    /// again after the connection to the slot's primary dropped, or with a
    /// slot map gone stale), is sent again after a short pause, up to
    /// [`LAYOUT_RESENDS`] times. Before each resend one plain command on
    /// that key (`EXISTS`) lets the cluster client follow the redirect and
    /// learn the cluster's layout again, which it does not do for an
    /// aborted transaction.
    pub(crate) async fn transact(
        &self,
        pipe: &redis::Pipeline,
        script: &redis::Script,
        resend: Option<&str>,
    ) -> Result<Vec<Value>> {
        let mut con = self.conn.clone();
        let run = |mut con: Conn| async move { pipe.query_async::<Vec<Value>>(&mut con).await };
        // One bound for the whole call, reload and resends included.
        self.bounded(async {
            let (mut reloaded, mut resent) = (false, 0u32);
            loop {
                match run(con.clone()).await {
                    Err(e)
                        if !reloaded
                            && e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        reloaded = true;
                        script.load_async(&mut con).await?;
                    }
                    Err(e) if resent < LAYOUT_RESENDS && errors::transaction_not_run(&e) => {
                        let Some(key) = resend else {
                            return Err(e);
                        };
                        resent += 1;
                        tokio::time::sleep(LAYOUT_PAUSE * resent).await;
                        // Its outcome does not matter: only the redirect
                        // the client follows (and learns from) on the way.
                        let _: redis::RedisResult<i64> =
                            redis::cmd("EXISTS").arg(key).query_async(&mut con).await;
                    }
                    outcome => return outcome,
                }
            }
        })
        .await
    }

    /// The key the write scripts keep the store-wide run index in: on one
    /// server `<prefix>:runs`; on a cluster, where a script may touch only
    /// its run's slot, the run's own document index, which the scripts
    /// then know not to index again (`list_runs` finds runs by `SCAN`
    /// instead).
    pub(crate) fn runs_key(&self, run: &RunId) -> String {
        if self.conn.is_cluster() {
            self.keys.docs(run)
        } else {
            self.keys.runs().to_owned()
        }
    }

    /// Every key matching `pattern` on every node holding keys (the one
    /// server, or each primary of a cluster): see [`Conn::walk`].
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        self.conn
            .walk(
                pattern,
                Reach::Everywhere,
                self.keys.prefix(),
                self.config.timeout,
            )
            .await
    }

    /// A page of runs on a cluster, which keeps no store-wide index: the
    /// runs whose document index exists (it does exactly while the run has
    /// documents), found by `SCAN` on every primary, sorted by name. Each
    /// page walks the whole keyspace, so it costs as much as the first.
    pub(crate) async fn cluster_runs(
        &self,
        after: Option<&RunId>,
        limit: usize,
    ) -> Result<ListPage<RunId>> {
        let mut runs: Vec<String> = self
            .scan(&self.keys.docs_pattern())
            .await?
            .iter()
            .filter_map(|key| self.keys.parse_docs(key))
            .filter(|run| after.is_none_or(|a| run.as_str() > a.as_str()))
            .collect();
        runs.sort_unstable();
        runs.dedup();
        let more = runs.len() > limit;
        let items = runs
            .into_iter()
            .take(limit)
            .map(|n| RunId::new(n).map_err(|_| unexpected("run id")))
            .collect::<Result<Vec<_>>>()?;
        Ok(ListPage::new(items, more))
    }

    /// Sends `pipe` (built without `atomic()`: a transaction in it is
    /// spelled out as `MULTI` … `EXEC`) with a `WAIT` for `wait_replicas`
    /// replicas right behind it, in the same request. Returns the replies
    /// of `pipe`'s commands, raw (server errors as values, an `EXEC` as
    /// the array of its transaction's replies), and the `WAIT`'s, which
    /// [`Inner::replicated`] judges once the caller knows the write was
    /// made. Bound by `timeout` plus `wait_timeout`.
    ///
    /// One request, not the write and then a `WAIT` of its own: `WAIT`
    /// counts the replicas that acknowledged the replication offset its
    /// *connection* reached. After the connection dropped, the cluster
    /// client sends a request again by itself, on a new connection, and a
    /// `WAIT` alone there would count from wherever that connection's
    /// offset stands: a `WAIT` that is a connection's first command
    /// answers at once with every connected replica (measured on Redis
    /// 7.0, where any command in front of it, a read too, moves the
    /// offset; servers that move it only for writes would leave it there).
    /// Sent together, a request sent again carries its write again, which
    /// answers as made (`applied`, or the owner's grant handed back) and
    /// moves the new connection's offset past the first send; after a
    /// failover it makes the write on the new primary if the old one took
    /// it along. It also saves a round trip.
    ///
    /// A script the server forgot (`NOSCRIPT`, as a reply or inside an
    /// `EXEC`'s) is loaded again and the request sent once more: nothing
    /// of it was written but the staging key, which every write clears
    /// first.
    pub(crate) async fn send_then_wait(
        &self,
        mut pipe: redis::Pipeline,
        script: &redis::Script,
    ) -> Result<(Vec<Value>, Value)> {
        pipe.cmd("WAIT")
            .arg(self.config.wait_replicas)
            .arg(u64::try_from(self.config.wait_timeout.as_millis()).unwrap_or(u64::MAX));
        let bound = self.config.timeout + self.config.wait_timeout;
        let deadline = tokio::time::Instant::now() + bound;
        let mut reloaded = false;
        loop {
            let mut con = self.conn.clone();
            let mut replies = until(
                deadline,
                bound,
                con.req_packed_commands(&pipe, 0, pipe.len()),
            )
            .await?;
            if replies.len() != pipe.len() {
                return Err(unexpected("pipelined replies"));
            }
            let acked = replies.pop().ok_or_else(|| unexpected("no reply"))?;
            if !reloaded && replies.iter().any(is_noscript) {
                reloaded = true;
                until(deadline, bound, script.load_async(&mut con)).await?;
                continue;
            }
            return Ok((replies, acked));
        }
    }

    /// What the `WAIT` sent behind a write ([`Inner::send_then_wait`], or
    /// ending a batch's pipeline) means for a write made before it
    /// (`None`: no `WAIT` asked): fewer acknowledgements than
    /// `wait_replicas` within `wait_timeout` fail with a retryable
    /// `Backend` error, since the write was made on the primary but a
    /// failover may lose it.
    pub(crate) fn replicated(&self, acked: Option<&Value>) -> Result<()> {
        match acked {
            None => Ok(()),
            Some(Value::Int(n)) => match u64::try_from(*n) {
                Ok(n) if n >= self.config.wait_replicas => Ok(()),
                Ok(n) => Err(self.unreplicated(n)),
                Err(_) => Err(unexpected("replica count")),
            },
            Some(Value::ServerError(error)) => Err(errors::map_redis_error(error.clone().into())),
            Some(_) => Err(unexpected("replica count")),
        }
    }

    /// The error of a write that fewer than `wait_replicas` replicas
    /// acknowledged (`acked` did) in time.
    pub(crate) fn unreplicated(&self, acked: u64) -> Error {
        Error::new(
            ErrorKind::Backend,
            format!(
                "only {acked} of {} replicas acknowledged the write within {} ms; \
                 it was made on the primary but a failover may lose it",
                self.config.wait_replicas,
                self.config.wait_timeout.as_millis()
            ),
        )
        .with_backend(BACKEND)
        .set_retryable(true)
    }
}

/// How many times a transaction a cluster node refused for the cluster's
/// layout is sent again (see [`Inner::transact`]).
const LAYOUT_RESENDS: u32 = 4;

/// The pause before the `n`-th of those resends is `n` times this: the
/// cluster client reconnects to a node whose connection dropped in the
/// background.
const LAYOUT_PAUSE: Duration = Duration::from_millis(25);
