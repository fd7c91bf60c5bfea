//! The connection every command of a store goes through: one server (a
//! [`ConnectionManager`], which reconnects by itself) or a Redis Cluster
//! (redis-rs's cluster client, which routes each command, script and
//! transaction to the primary of its keys' slot, follows `MOVED`/`ASK`
//! and refreshes its slot map after a failover).
//!
//! The store's logic is written once against [`Conn`]: only the few
//! operations that must see every primary (`SCAN`, for listing runs and
//! locks and for purging a prefix) ask which kind it is.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to one server or to a cluster. Cheap to clone; clones
/// share the underlying multiplexed connection(s).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server (or a single-shard deployment).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A primary's address, `(host, port)`, as the cluster announces it.
pub(crate) type Node = (String, u16);

/// The primaries of a cluster that are not marked failed, read from
/// `CLUSTER NODES` (one line per node: `<id> <ip:port@cport[,hostname]>
/// <flags> …`).
fn primaries_of(text: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_id), Some(addr), Some(flags)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
            continue;
        }
        // A primary that serves no slot (a former primary, say) has none of
        // the store's keys; it is harmless to scan, so it is kept.
        let addr = addr.split(['@', ',']).next().unwrap_or_default();
        if let Some((host, port)) = addr.rsplit_once(':')
            && let Ok(port) = port.parse::<u16>()
            && !host.is_empty()
        {
            nodes.push((host.trim_matches(['[', ']']).to_owned(), port));
        }
    }
    nodes.sort();
    nodes.dedup();
    nodes
}

impl Conn {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The nodes a `SCAN` must visit to see every key: the one server, or
    /// every live primary of the cluster (`None` stands for "the one
    /// server").
    pub(crate) async fn scan_targets(&mut self) -> RedisResult<Vec<Option<Node>>> {
        match self {
            Conn::Single(_) => Ok(vec![None]),
            Conn::Cluster(c) => {
                let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
                Ok(primaries_of(&text).into_iter().map(Some).collect())
            }
        }
    }

    /// Runs `cmd` on `node` (`None`: wherever the connection sends it).
    pub(crate) async fn query_on<T: FromRedisValue>(
        &mut self,
        node: Option<&Node>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (Conn::Cluster(c), Some((host, port))) => {
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
            (con, _) => cmd.query_async(con).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 1 3 connected
d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
e5 127.0.0.1:7005@17005,node5.example master - 0 1 5 connected 10923-16383
";
        assert_eq!(
            primaries_of(text),
            vec![
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002),
                ("127.0.0.1".to_owned(), 7005),
            ]
        );
    }
}
