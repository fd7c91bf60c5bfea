//! The connection every command of a store goes through: one server (a
//! [`ConnectionManager`], which reconnects by itself) or a Redis Cluster
//! (redis-rs's cluster client, which routes each command, script and
//! transaction to the primary of its keys' slot, follows `MOVED`/`ASK`
//! and reads the layout again after a redirect or a lost connection).
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

use crate::SCAN_COUNT;
use crate::errors::{layout_changed, map_redis_error, within};

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

/// The error of a walk that cannot see every key as the layout says: a
/// slot unserved (a cluster still forming or losing a shard), or a node
/// other than the slot's primary answering. Retryable, as `CLUSTERDOWN`
/// is: the layout settles, or the cluster client reconnects.
fn not_whole(what: &'static str, detail: String) -> RedisError {
    RedisError::from((
        RedisKind::Server(ServerErrorKind::ClusterDown),
        what,
        detail,
    ))
}

/// The slot whose primary answers `CLUSTER SLOTS`, both times a walk asks
/// it (before and after), so that both answers normally come from the same
/// node's view (a primary down or replaced in between makes the walk fail,
/// retryable, at worst for nothing).
const LAYOUT_SLOT: u16 = 0;

/// A cluster's layout as one node answered `CLUSTER SLOTS`: each range of
/// slots with the id of the primary serving it, sorted by its first slot,
/// covering every slot exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout(Vec<(u16, u16, String)>);

impl Layout {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …],
    /// replica…], …]`. The primary is known by its node id, never by its
    /// announced address: a node that never met another announces an empty
    /// host, and one without a known endpoint `?` or nothing.
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
            let Some(id) = text(primary.get(2)).filter(|id| !id.is_empty()) else {
                return Err(malformed("a primary without its node id"));
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

    /// One target per primary: the first slot it serves, its id, and a
    /// slot of another primary (none on a cluster of one primary).
    fn targets(&self) -> Vec<ScanTarget> {
        let mut seen = std::collections::HashSet::new();
        self.0
            .iter()
            .filter(|(_, _, id)| seen.insert(id.as_str()))
            .map(|(start, _, id)| self.target(*start, id))
            .collect()
    }

    /// The target of the primary serving slot `at`.
    fn target_of(&self, at: u16) -> RedisResult<ScanTarget> {
        self.0
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&at))
            .map(|(_, _, id)| self.target(at, id))
            .ok_or_else(|| {
                not_whole(
                    "the redis cluster does not serve every slot",
                    format!("slot {at} is unserved"),
                )
            })
    }

    /// The primary `id`, reached through its slot `at`, with a slot of
    /// another primary to nudge the client through.
    fn target(&self, at: u16, id: &str) -> ScanTarget {
        ScanTarget::Primary {
            slot: at,
            id: id.to_owned(),
            foreign: self
                .0
                .iter()
                .find(|(_, _, other)| other != id)
                .map(|(other, _, _)| *other),
        }
    }
}

/// Which keys a [`Conn::walk`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach<'a> {
    /// Every key, on every node holding keys.
    Everywhere,
    /// The keys of the slot this key hashes to (by its hash tag), on the
    /// one node holding them.
    SlotOf(&'a str),
}

/// Where a `SCAN` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanTarget {
    /// The one server.
    Server,
    /// A cluster's primary, reached through a slot it serves (by the
    /// cluster client's own slot map, whatever address the node
    /// announces), known by its node id; `foreign` is a slot another
    /// primary serves (see [`Conn::query_on`]).
    Primary {
        slot: u16,
        id: String,
        foreign: Option<u16>,
    },
}

impl Conn {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The cluster's layout (`None` on one server), whole, as the primary
    /// of [`LAYOUT_SLOT`] answers `CLUSTER SLOTS`: see [`Layout::parse`]
    /// for its errors.
    pub(crate) async fn layout(&mut self) -> RedisResult<Option<Layout>> {
        match self {
            Conn::Single(_) => Ok(None),
            Conn::Cluster(c) => {
                let reply = c
                    .route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(to_primary(LAYOUT_SLOT)?),
                    )
                    .await?;
                Layout::parse(reply.extract_error()?).map(Some)
            }
        }
    }

    /// The places a `SCAN` must visit to see the keys `reach` names by
    /// `layout`: the one server, each primary, or the primary of one slot.
    fn scan_targets(layout: Option<&Layout>, reach: Reach<'_>) -> RedisResult<Vec<ScanTarget>> {
        match (layout, reach) {
            (None, _) => Ok(vec![ScanTarget::Server]),
            (Some(layout), Reach::Everywhere) => Ok(layout.targets()),
            (Some(layout), Reach::SlotOf(key)) => {
                Ok(vec![layout.target_of(slot_number(Slot::for_key(key)))?])
            }
        }
    }

    /// Every key matching `pattern` among those `reach` names, `SCAN_COUNT`
    /// asked per call, each request under `timeout`. A key may be returned
    /// more than once.
    ///
    /// On a cluster, each primary is reached through a slot it serves, by
    /// the layout read before the walk, and must answer as itself (see
    /// [`Conn::query_on`], whose nudges go under `prefix`); the layout is
    /// read again after the walk, and a change (a failover, a slot handed
    /// over) fails it, retryable. Keys moving one by one while a slot is
    /// being resharded are not seen by either check: a key moved from a
    /// primary not yet walked to one already walked is missed.
    ///
    /// # Errors
    /// As each request's; a layout that changed during the walk, or that
    /// leaves a slot unserved (retryable).
    pub(crate) async fn walk(
        &self,
        pattern: &str,
        reach: Reach<'_>,
        prefix: &str,
        timeout: std::time::Duration,
    ) -> runstate_core::Result<Vec<String>> {
        let mut con = self.clone();
        let mut found = Vec::new();
        let layout = within(timeout, con.layout()).await?;
        let targets = Self::scan_targets(layout.as_ref(), reach).map_err(map_redis_error)?;
        for target in targets {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                let (next, batch): (u64, Vec<String>) =
                    within(timeout, con.query_on(&target, &cmd, prefix, timeout / 4)).await?;
                found.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        if layout.is_some() && within(timeout, con.layout()).await? != layout {
            return Err(layout_changed());
        }
        Ok(found)
    }

    /// Runs the keyless `cmd` (a `SCAN`) on `target`.
    ///
    /// On a cluster, the client sends a request for a slot whose primary it
    /// is not connected to (while it reconnects, or after a failover it has
    /// not learnt) to any other node, and a node never redirects a keyless
    /// command: the request also carries `CLUSTER MYID`. When another node
    /// than the primary expected answered, the client is made to learn the
    /// layout, and the request is sent once more; a second wrong node fails
    /// it, retryable, instead of walking the wrong node's keys (or another
    /// node's cursor). To learn it, the client sends a keyed `EXISTS` for
    /// the slot (under `prefix`, so a user whose ACL allows only the
    /// store's keys may send it) to the primary of a `foreign` slot, which
    /// does not serve the key's slot and redirects it (`MOVED`): the client
    /// reads the layout again before it routes anything else. The nudge has
    /// at most `nudge_bound`, so a primary that is down still leaves the
    /// call time to fail with its own error.
    async fn query_on<T: FromRedisValue>(
        &mut self,
        target: &ScanTarget,
        cmd: &Cmd,
        prefix: &str,
        nudge_bound: std::time::Duration,
    ) -> RedisResult<T> {
        match (self, target) {
            (Conn::Single(c), ScanTarget::Server) => cmd.query_async(c).await,
            (
                Conn::Cluster(c),
                ScanTarget::Primary {
                    slot: at,
                    id,
                    foreign,
                },
            ) => {
                let mut pipe = redis::pipe();
                pipe.cmd("CLUSTER").arg("MYID").add_command(cmd.clone());
                let mut nudged = false;
                loop {
                    let replies = c
                        .route_pipeline(pipe.clone(), 0, 2, to_primary(*at)?)
                        .await?;
                    let mut replies = replies.into_iter();
                    let (Some(answered), Some(reply)) = (replies.next(), replies.next()) else {
                        return Err(RedisError::from((
                            RedisKind::UnexpectedReturnType,
                            "a pipeline of two commands answered fewer",
                        )));
                    };
                    let answered: String = redis::from_redis_value(answered.extract_error()?)?;
                    if answered == *id {
                        return redis::from_redis_value(reply.extract_error()?).map_err(Into::into);
                    }
                    let Some(foreign) = foreign.filter(|_| !nudged) else {
                        return Err(not_whole(
                            "another redis cluster node than the slot's primary answered",
                            format!("slot {at}: {answered} answered for {id}"),
                        ));
                    };
                    nudged = true;
                    let nudge = c.route_command(
                        redis::cmd("EXISTS")
                            .arg(format!("{prefix}:{}", tag_in(*at)?))
                            .clone(),
                        RoutingInfo::SingleNode(to_primary(foreign)?),
                    );
                    // Its outcome does not matter, only the redirect.
                    if let Ok(Err(error)) = tokio::time::timeout(nudge_bound, nudge).await {
                        tracing::debug!(%error, "the nudge of a redis cluster walk failed");
                    }
                }
            }
            _ => Err(RedisError::from((
                RedisKind::Client,
                "a scan target of another kind of connection",
            ))),
        }
    }
}

/// A hash tag `{n}` in slot `at`: the smallest `n` whose tag hashes to it
/// (109,757 for the last slot found; about 160,000 tags cover every slot),
/// from a table made once, the first time a walk needs one.
fn tag_in(at: u16) -> RedisResult<String> {
    static TAGS: std::sync::OnceLock<std::collections::HashMap<Slot, u32>> =
        std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = std::collections::HashMap::with_capacity(SLOTS as usize);
        let mut tag = String::new();
        for n in 0u32.. {
            if tags.len() == SLOTS as usize {
                break;
            }
            tag.clear();
            tag.push('{');
            tag.push_str(&n.to_string());
            tag.push('}');
            tags.entry(Slot::for_key(&tag)).or_insert(n);
        }
        tags
    });
    let n = tags
        .get(&slot(at)?)
        .ok_or_else(|| RedisError::from((RedisKind::Client, "a slot without a hash tag")))?;
    Ok(format!("{{{n}}}"))
}

/// The number of `slot`, which redis-rs keeps to itself: found by trying
/// each (at most 16,384 comparisons, next to a round trip nothing).
fn slot_number(slot: Slot) -> u16 {
    (0..SLOTS)
        .filter_map(|n| u16::try_from(n).ok())
        .find(|n| Slot::new(*n) == Some(slot))
        .unwrap_or_default()
}

/// `slot` as the cluster client takes it.
fn slot(slot: u16) -> RedisResult<Slot> {
    Slot::new(slot).ok_or_else(|| {
        RedisError::from((RedisKind::Client, "a slot out of range", slot.to_string()))
    })
}

/// The route to the primary serving slot `at`, by the cluster client's own
/// slot map.
fn to_primary(at: u16) -> RedisResult<SingleNodeRoutingInfo> {
    Ok(SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
        slot(at)?,
        SlotAddr::Master,
    )))
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
    /// another), `?` or nothing is scanned too, known by its id; Redis 7's
    /// fourth field (the node's metadata) changes nothing.
    #[test]
    fn a_scan_visits_one_slot_of_each_primary() {
        let with_metadata = |start, end, host: Value, id: &str, metadata: Value| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![host, Value::Int(7004), bulk(id), metadata]),
            ])
        };
        let reply = Value::Array(vec![
            range(10923, 16383, "127.0.0.1", 7003, "c3"),
            range(0, 5000, "", 7001, "a1"),
            range(5461, 10000, "node2.example", 7002, "b2"),
            range(5001, 5460, "", 7001, "a1"),
            with_metadata(
                10001,
                10500,
                bulk("?"),
                "d4",
                Value::Array(vec![bulk("hostname"), bulk("")]),
            ),
            with_metadata(
                10501,
                10922,
                Value::Nil,
                "e5",
                Value::Map(vec![(bulk("hostname"), bulk("node5"))]),
            ),
        ]);
        let layout = Layout::parse(reply).expect("every slot served");
        let primary = |slot, id: &str, foreign| ScanTarget::Primary {
            slot,
            id: id.to_owned(),
            foreign,
        };
        fn targets(layout: Option<&Layout>, reach: Reach<'_>) -> Vec<ScanTarget> {
            Conn::scan_targets(layout, reach).expect("targets of a whole layout")
        }
        assert_eq!(
            targets(Some(&layout), Reach::Everywhere),
            vec![
                primary(0, "a1", Some(5461)),
                primary(5461, "b2", Some(0)),
                primary(10001, "d4", Some(0)),
                primary(10501, "e5", Some(0)),
                primary(10923, "c3", Some(0)),
            ]
        );
        // One slot's keys: only the primary serving that slot, reached
        // through the slot itself.
        for (at, id, foreign) in [(7000, "b2", 0), (5000, "a1", 5461), (16383, "c3", 0)] {
            let key = format!("rs:cache:{}:doc", tag_in(at).expect("a tag"));
            assert_eq!(
                targets(Some(&layout), Reach::SlotOf(&key)),
                vec![primary(at, id, Some(foreign))],
                "slot {at}"
            );
        }
        let single = Value::Array(vec![range(0, 16383, "", 7001, "a1")]);
        let layout = Layout::parse(single).expect("one node");
        assert_eq!(
            targets(Some(&layout), Reach::Everywhere),
            vec![primary(0, "a1", None)]
        );
        assert_eq!(targets(None, Reach::Everywhere), vec![ScanTarget::Server]);
        assert_eq!(
            targets(None, Reach::SlotOf("rs:cache:{r}:d")),
            vec![ScanTarget::Server]
        );
    }

    /// A slot's number is read back from the client's type.
    #[test]
    fn a_slot_number_is_read_back() {
        for at in [0, 1, 5460, 16383] {
            assert_eq!(slot_number(slot(at).expect("a slot")), at);
        }
    }

    /// Every slot has a hash tag that hashes to it (the nudge's key).
    #[test]
    fn every_slot_has_a_tag() {
        for at in 0..16384u16 {
            let tag = tag_in(at).expect("a tag");
            assert_eq!(
                Slot::for_key(&tag),
                Slot::new(at).expect("a slot"),
                "slot {at}"
            );
        }
        assert!(tag_in(16384).is_err());
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
        let no_id = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001)]),
        ])]);
        for malformed in [bulk("not slots"), no_id] {
            let error = Layout::parse(malformed).expect_err("malformed");
            assert!(!crate::errors::map_redis_error(error).is_retryable());
        }
    }
}
