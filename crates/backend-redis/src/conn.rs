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
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{
    Cmd, ErrorKind as RedisKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

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

/// Every slot of a Redis Cluster.
const SLOTS: u32 = 16384;

/// The error of a layout that cannot be scanned whole: retryable, as a
/// cluster still forming, or losing or moving a shard, is (`CLUSTERDOWN`).
fn not_whole(what: &'static str, detail: String) -> RedisError {
    RedisError::from((
        RedisKind::Server(ServerErrorKind::ClusterDown),
        what,
        detail,
    ))
}

/// A cluster's layout as one node answered `CLUSTER SLOTS`: each range of
/// slots with the id of the primary serving it, sorted by its first slot,
/// covering every slot exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout(Vec<(u16, u16, String)>);

impl Layout {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …],
    /// replica…], …]`. The primary is known by its id (by `host:port` on a
    /// server too old to name it), never by the announced address alone: a
    /// node that never met another announces an empty host.
    ///
    /// # Errors
    /// A malformed reply; ranges that leave a slot unserved or serve one
    /// twice (a cluster still forming, or in the middle of a change), for
    /// which a listing would miss keys while reporting success: retryable.
    fn parse(reply: Value) -> RedisResult<Layout> {
        let malformed = |what: &str| {
            RedisError::from((
                RedisKind::UnexpectedReturnType,
                "malformed CLUSTER SLOTS reply",
                what.to_owned(),
            ))
        };
        let Value::Array(ranges) = reply else {
            return Err(malformed("not an array"));
        };
        let mut layout = Vec::with_capacity(ranges.len());
        for range in ranges {
            let Value::Array(fields) = range else {
                return Err(malformed("a range is not an array"));
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(malformed("a range lacks its slots or its primary"));
            };
            let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
                return Err(malformed("a slot out of range"));
            };
            if start > end || u32::from(end) >= SLOTS {
                return Err(malformed("a slot out of range"));
            }
            let text = |value: Option<&Value>| match value {
                Some(Value::BulkString(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
                Some(Value::SimpleString(text)) => Some(text.clone()),
                _ => None,
            };
            let id = match (text(primary.get(2)), text(primary.first()), primary.get(1)) {
                (Some(id), _, _) if !id.is_empty() => id,
                (_, Some(host), Some(Value::Int(port))) => format!("{host}:{port}"),
                _ => return Err(malformed("a primary without an id or an address")),
            };
            layout.push((start, end, id));
        }
        layout.sort_unstable();
        let mut next: u32 = 0;
        for (start, end, _) in &layout {
            if u32::from(*start) != next {
                return Err(not_whole(
                    "the redis cluster does not serve every slot",
                    format!("slot {next} is unserved or served twice"),
                ));
            }
            next = u32::from(*end) + 1;
        }
        if next != SLOTS {
            return Err(not_whole(
                "the redis cluster does not serve every slot",
                format!("slots {next} to {} are unserved", SLOTS - 1),
            ));
        }
        Ok(Layout(layout))
    }

    /// One slot per primary, the first it serves: a command routed by that
    /// slot reaches the primary through the cluster client's own slot map,
    /// whatever address the node announces.
    fn targets(&self) -> Vec<u16> {
        let mut seen = std::collections::HashSet::new();
        self.0
            .iter()
            .filter(|(_, _, id)| seen.insert(id.as_str()))
            .map(|(start, _, _)| *start)
            .collect()
    }
}

/// Where a `SCAN` goes: the one server (`None`), or the primary serving a
/// slot.
pub(crate) type ScanTarget = Option<u16>;

impl Conn {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The cluster's layout (`None` on one server), whole: see
    /// [`Layout::parse`] for its errors.
    pub(crate) async fn layout(&mut self) -> RedisResult<Option<Layout>> {
        match self {
            Conn::Single(_) => Ok(None),
            Conn::Cluster(c) => {
                let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
                Layout::parse(reply).map(Some)
            }
        }
    }

    /// The places a `SCAN` must visit to see every key of `layout`: the one
    /// server, or one slot of each primary.
    pub(crate) fn scan_targets(layout: Option<&Layout>) -> Vec<ScanTarget> {
        layout.map_or_else(
            || vec![None],
            |layout| layout.targets().into_iter().map(Some).collect(),
        )
    }

    /// Runs `cmd` on the primary serving `slot` (`None`: wherever the
    /// connection sends it).
    pub(crate) async fn query_on<T: FromRedisValue>(
        &mut self,
        slot: ScanTarget,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, slot.and_then(Slot::new)) {
            (Conn::Cluster(c), Some(slot)) => {
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::with_slot(slot, SlotAddr::Master),
                        )),
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

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    /// A `CLUSTER SLOTS` range served by `(host, port, id)`, with a replica.
    fn range(start: i64, end: i64, host: &str, port: i64, id: &str) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![bulk(host), Value::Int(port), bulk(id)]),
            Value::Array(vec![
                bulk("127.0.0.1"),
                Value::Int(port + 3),
                bulk("replica"),
            ]),
        ])
    }

    /// Whatever flags a node gives the primaries, `CLUSTER SLOTS` names the
    /// one serving each range: a primary serving two ranges is scanned
    /// once, one whose node announces no host (a single node that never met
    /// another) is scanned too.
    #[test]
    fn a_scan_visits_one_slot_of_each_primary() {
        let reply = Value::Array(vec![
            range(10923, 16383, "127.0.0.1", 7003, "c3"),
            range(0, 5000, "", 7001, "a1"),
            range(5461, 10922, "node2.example", 7002, "b2"),
            range(5001, 5460, "", 7001, "a1"),
        ]);
        let layout = Layout::parse(reply).expect("every slot served");
        assert_eq!(layout.targets(), vec![0, 5461, 10923]);
        let single = Value::Array(vec![range(0, 16383, "", 7001, "a1")]);
        assert_eq!(Layout::parse(single).expect("one node").targets(), vec![0]);
    }

    /// A layout that leaves a slot unserved or serves one twice is not
    /// scanned: a listing would miss keys and report success. The error is
    /// retryable, as `CLUSTERDOWN` is.
    #[test]
    fn a_layout_missing_a_slot_is_refused() {
        for reply in [
            Value::Array(vec![range(0, 16382, "127.0.0.1", 7001, "a1")]),
            Value::Array(vec![
                range(0, 100, "127.0.0.1", 7001, "a1"),
                range(102, 16383, "127.0.0.1", 7002, "b2"),
            ]),
            Value::Array(vec![
                range(0, 9000, "127.0.0.1", 7001, "a1"),
                range(8000, 16383, "127.0.0.1", 7002, "b2"),
            ]),
            Value::Array(vec![]),
        ] {
            let error = Layout::parse(reply.clone()).expect_err("not whole");
            let mapped = crate::errors::map_redis_error(error);
            assert!(mapped.is_retryable(), "{reply:?}: {mapped}");
        }
        let malformed = Layout::parse(bulk("not slots")).expect_err("malformed");
        assert!(!crate::errors::map_redis_error(malformed).is_retryable());
    }
}
