//! Redis errors mapped to runstate's kinds, in exactly one place.

use std::future::Future;
use std::time::Duration;

use redis::{ErrorKind as RedisKind, RedisError, ServerErrorKind};
use runstate_core::time::Short;
use runstate_core::{Error, ErrorKind};

use crate::BACKEND;

/// Whether a node refused a command because of where the cluster serves
/// its slot or how it is doing (a redirect, a failover under way, a node
/// still loading): the command was not run, and may be sent again once the
/// client knows the cluster's layout.
fn refused_by_topology(kind: Option<ServerErrorKind>) -> bool {
    matches!(
        kind,
        Some(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::BusyLoading
        )
    )
}

/// Whether the server answered `error` as a refusal of the command itself
/// (an ACL that does not cover a key or channel, an unknown or disabled
/// command, …), not for the cluster's layout or the connection, which
/// stays usable. For the listener's `SUBSCRIBE` and `UNSUBSCRIBE` such an
/// answer comes again for the same channels: sending them again on a new
/// connection would not help.
pub(crate) fn refused_by_server(error: &RedisError) -> bool {
    matches!(error.kind(), RedisKind::Server(kind) if !refused_by_topology(Some(kind)))
}

/// Whether `error` is a `MULTI`/`EXEC` the node aborted (`EXECABORT`)
/// because it refused a queued command for the cluster's layout only (a
/// redirect, …): none of the transaction was run, so it may be sent again.
/// The cluster client follows redirects of single commands itself but
/// hands back an aborted transaction, as it does when it sends one to
/// another node after the connection to the slot's primary dropped.
pub(crate) fn transaction_not_run(error: &RedisError) -> bool {
    error.kind() == RedisKind::Server(ServerErrorKind::ExecAbort)
        && error.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty() && errors.iter().all(|(_, e)| refused_by_topology(e.kind()))
        })
}

/// Maps a redis-rs error to a runstate error, keeping it as the source.
///
/// Connection trouble, timeouts, a server still loading its data, a
/// replica that became read-only in a failover, `TRYAGAIN`/`MASTERDOWN`
/// and a transaction a cluster node aborted for such a reason or a
/// redirect ([`transaction_not_run`]) are retryable; authentication and
/// permission failures are configuration problems; everything else is a
/// permanent backend error.
pub(crate) fn map_redis_error(error: RedisError) -> Error {
    let (kind, retryable, what) = if error.is_timeout() {
        (ErrorKind::Timeout, true, "redis did not answer in time")
    } else if error.is_connection_refusal() {
        (ErrorKind::Backend, true, "redis refused the connection")
    } else if error.is_connection_dropped() || error.is_io_error() {
        (ErrorKind::Backend, true, "the connection to redis failed")
    } else {
        match error.kind() {
            RedisKind::AuthenticationFailed => {
                (ErrorKind::Config, false, "redis refused the credentials")
            }
            RedisKind::InvalidClientConfig => {
                (ErrorKind::Config, false, "invalid redis client settings")
            }
            // No connection to the node serving the slot, as during a
            // failover: the layout will be learnt again.
            RedisKind::ClusterConnectionNotFound => (
                ErrorKind::Backend,
                true,
                "no connection to the redis cluster node serving this request",
            ),
            RedisKind::Server(server) => match server {
                // A redirect the cluster client did not follow to the end
                // (its own retries spent) is refused like the rest: this
                // attempt ran nothing.
                server if refused_by_topology(Some(server)) => (
                    ErrorKind::Backend,
                    true,
                    "redis is not ready to serve this request",
                ),
                ServerErrorKind::ExecAbort if transaction_not_run(&error) => (
                    ErrorKind::Backend,
                    true,
                    "a redis cluster node refused the transaction for the cluster's layout: \
                     this attempt ran nothing, but an earlier attempt whose reply was lost \
                     may have been made (read the document before writing it again)",
                ),
                ServerErrorKind::NoPerm => {
                    (ErrorKind::Denied, false, "redis denied the command (ACL)")
                }
                _ => (ErrorKind::Backend, false, "redis returned an error"),
            },
            // Refusals of a moment, which redis-rs does not name: a script
            // running long (`BUSY`), fewer replicas than
            // `min-replicas-to-write` (`NOREPLICAS`); the command was not
            // run. (`OOM` is left permanent: a script meets it at its first
            // write that needs memory, after any that did not.)
            RedisKind::Extension if matches!(error.code(), Some("BUSY" | "NOREPLICAS")) => (
                ErrorKind::Backend,
                true,
                "redis refused the command for now (busy with a script, or short of replicas)",
            ),
            _ => (ErrorKind::Backend, false, "redis request failed"),
        }
    };
    Error::new(kind, what)
        .with_backend(BACKEND)
        .with_source(error)
        .set_retryable(retryable)
}

/// The error of a walk over every primary of a cluster whose layout
/// changed meanwhile (a failover, a slot moved): it may have missed keys,
/// so it reports nothing; a second walk will see the new layout.
pub(crate) fn layout_changed() -> Error {
    Error::new(
        ErrorKind::Backend,
        "the redis cluster's layout changed during a walk over every primary",
    )
    .with_backend(BACKEND)
    .set_retryable(true)
}

/// The error of a call that outlived its bound.
pub(crate) fn timed_out(bound: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no answer from redis within {}", Short(bound)),
    )
    .with_backend(BACKEND)
    .set_retryable(true)
}

/// Runs `request` for at most `bound`: its outcome, errors mapped by
/// [`map_redis_error`], or [`timed_out`].
pub(crate) async fn within<T>(
    bound: Duration,
    request: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    until(tokio::time::Instant::now() + bound, bound, request).await
}

/// As [`within`], until `deadline`; `bound` is the whole call's bound, the
/// one a timeout reports.
pub(crate) async fn until<T>(
    deadline: tokio::time::Instant,
    bound: Duration,
    request: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout_at(deadline, request).await {
        Ok(outcome) => outcome.map_err(map_redis_error),
        Err(_) => Err(timed_out(bound)),
    }
}

/// A reply the scripts never produce.
pub(crate) fn unexpected(what: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("unexpected reply from redis: {what}"),
    )
    .with_backend(BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a cluster answers while its layout changes is worth another
    /// try: a redirect left once the client's own retries were spent, no
    /// connection to the node of a slot (before: permanent `Backend`
    /// errors, on which waiters stop waiting).
    #[test]
    fn a_cluster_in_transition_is_retryable() {
        for error in [
            RedisError::from((RedisKind::Server(ServerErrorKind::Moved), "MOVED")),
            RedisError::from((RedisKind::Server(ServerErrorKind::Ask), "ASK")),
            RedisError::from((RedisKind::ClusterConnectionNotFound, "no connection")),
            RedisError::from((RedisKind::Server(ServerErrorKind::TryAgain), "TRYAGAIN")),
        ] {
            let mapped = map_redis_error(error);
            assert_eq!(mapped.kind(), ErrorKind::Backend, "{mapped}");
            assert!(mapped.is_retryable(), "{mapped}");
        }
        let other = map_redis_error(RedisError::from((
            RedisKind::Server(ServerErrorKind::ResponseError),
            "ERR",
        )));
        assert!(!other.is_retryable(), "{other}");
    }

    /// A server refusing for the moment (a long script,
    /// `min-replicas-to-write`) is worth another try; these were permanent
    /// errors, on which lock waits stopped. `OOM` stays permanent.
    #[test]
    fn refusals_of_a_moment_are_retryable() {
        let mapped = |reply: &[u8]| {
            map_redis_error(
                redis::parse_redis_value(reply)
                    .and_then(redis::Value::extract_error)
                    .expect_err("a server error"),
            )
        };
        for reply in [
            &b"-BUSY Redis is busy running a script.\r\n"[..],
            b"-NOREPLICAS Not enough good replicas to write.\r\n",
        ] {
            let mapped = mapped(reply);
            assert_eq!(mapped.kind(), ErrorKind::Backend, "{mapped}");
            assert!(mapped.is_retryable(), "{mapped}");
        }
        for reply in [
            &b"-WRONGTYPE Operation against a key\r\n"[..],
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
        ] {
            assert!(!mapped(reply).is_retryable());
        }
    }
}
