//! Status messages and milestones.
//!
//! **Status messages** of a run are a Redis Stream, `<prefix>:{run}:status`
//! (fields `topic`, `text`, `at`), appended by one script that also trims
//! it (`XADD … MAXLEN ~ <status_history>`, and `XTRIM … MINID`, exact, when
//! `status_minutes` is set) and announces the entry, id included, on the
//! run's status channel. A message's id is its stream id. A subscription
//! follows the channel through the store's listener (see
//! [`listener`]) and reads the stream for its replay
//! (`XRANGE`, or `XREVRANGE … COUNT n` for the last `n`): it subscribes
//! first, then reads, then delivers what it heard that is newer than what
//! it read, so nothing falls between the two. After the listener
//! reconnected it reads the stream from its last message on, so nothing
//! is lost either; it says `Resync` when messages it missed may have been
//! trimmed away meanwhile (its last message is gone and newer ones are
//! there; or, when the stream was empty at the start, the stream lost an
//! entry since; or the stream is gone, its run deleted), or the stream
//! could not be read. The feed has room for the whole replay and a
//! buffer's worth after it; a subscriber whose feed overflows gets
//! `Resync` from the feed itself, then the newest messages.
//!
//! **Milestones** of a run are a hash, `<prefix>:{run}:milestones`, with
//! WEPPcloud's field names: `timestamps:<task>` (epoch seconds, with a
//! fraction when the time has one) and `attrs:<name>`. Each mark is one
//! `HSET` of one field: atomic per field, no lock. Fields of other shapes
//! are left alone and not reported.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::Value;
use runstate_core::time::from_unix_millis;
use runstate_core::{
    Error, ErrorKind, FeedSender, Milestones, Operation, Replay, Result, RunId, StatusEvent,
    StatusMessage,
};
use tokio::sync::mpsc;

use crate::errors::{map_redis_error, unexpected};
use crate::listener::{self, Membership, Note};
use crate::{BACKEND, Inner};

/// Entries asked of each `XRANGE` page.
const PAGE: usize = 1000;

/// A stream id, `<ms>-<seq>`, ordered as the server orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct StreamId(u64, u64);

impl StreamId {
    /// Before every entry.
    pub(crate) const ZERO: StreamId = StreamId(0, 0);

    pub(crate) fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The id of a message this backend made (its stream id).
fn id_of(message: &StatusMessage) -> Option<StreamId> {
    StreamId::parse(&message.id)
}

/// Reads an `XRANGE`/`XREVRANGE` reply: `[[id, [field, value, …]], …]`.
pub(crate) fn entries(value: Value) -> Result<Vec<StatusMessage>> {
    let Value::Array(items) = value else {
        return Err(unexpected("stream range"));
    };
    let text = |value: Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| unexpected("not UTF-8")),
        Value::SimpleString(text) => Ok(text),
        _ => Err(unexpected("stream field")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(unexpected("stream entry"));
        };
        let mut pair = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (pair.next(), pair.next()) else {
            return Err(unexpected("stream entry"));
        };
        let id = text(id)?;
        let (mut topic, mut message, mut at) = (None, None, 0);
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            match text(name)?.as_str() {
                "topic" => topic = Some(text(value)?),
                "text" => message = Some(text(value)?),
                "at" => at = text(value)?.parse().unwrap_or(0),
                _ => {}
            }
        }
        let (Some(topic), Some(message)) = (topic, message) else {
            return Err(unexpected("status entry without topic or text"));
        };
        out.push(StatusMessage::new(id, topic, message, from_unix_millis(at)));
    }
    Ok(out)
}

impl Inner {
    /// Sets one field of the run's milestones hash: one `HSET`, atomic by
    /// itself, no lock.
    pub(crate) async fn set_field(&self, run: &RunId, field: &str, value: &str) -> Result<()> {
        let mut con = self.conn.clone();
        let _: i64 = self
            .bounded(
                redis::cmd("HSET")
                    .arg(self.keys.milestones(run))
                    .arg(field)
                    .arg(value)
                    .query_async(&mut con),
            )
            .await?;
        Ok(())
    }

    /// The `XRANGE` of one page of `run`'s history from `start`
    /// (inclusive; `(<id>` after an entry, `-` for the first entry).
    fn page_request(&self, run: &RunId, start: &str, count: usize) -> redis::Cmd {
        let mut request = redis::cmd("XRANGE");
        request
            .arg(self.keys.status(run))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count);
        request
    }

    /// One page of `run`'s history from `start` ([`page_request`](Self::page_request)).
    async fn status_page(
        &self,
        run: &RunId,
        start: &str,
        count: usize,
    ) -> Result<Vec<StatusMessage>> {
        let mut con = self.conn.clone();
        let value: Value = self
            .bounded(self.page_request(run, start, count).query_async(&mut con))
            .await?;
        entries(value)
    }

    /// Every entry after `after` (all of them from [`StreamId::ZERO`]), in
    /// pages.
    async fn status_after(&self, run: &RunId, after: StreamId) -> Result<Vec<StatusMessage>> {
        let mut out: Vec<StatusMessage> = Vec::new();
        let mut start = match after {
            StreamId::ZERO => "-".to_owned(),
            id => format!("({id}"),
        };
        loop {
            let page = self.status_page(run, &start, PAGE).await?;
            let full = page.len() == PAGE;
            out.extend(page);
            match out.last() {
                Some(last) if full => start = format!("({}", last.id),
                _ => return Ok(out),
            }
        }
    }

    /// The newest `n` entries, oldest first.
    async fn status_last(&self, run: &RunId, n: usize) -> Result<Vec<StatusMessage>> {
        let mut con = self.conn.clone();
        let value: Value = self
            .bounded(
                redis::cmd("XREVRANGE")
                    .arg(self.keys.status(run))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    // The server refuses a count past `i64::MAX`; no stream
                    // holds that many.
                    .arg(i64::try_from(n).unwrap_or(i64::MAX))
                    .query_async(&mut con),
            )
            .await?;
        let mut newest = entries(value)?;
        newest.reverse();
        Ok(newest)
    }

    /// What a new subscription replays, and the id it follows on from.
    pub(crate) async fn status_replay(
        &self,
        run: &RunId,
        replay: Replay,
    ) -> Result<(Vec<StatusMessage>, StreamId)> {
        let (replayed, position) = match replay {
            Replay::All => {
                let all = self.status_after(run, StreamId::ZERO).await?;
                (all, None)
            }
            Replay::Last(n) if n > 0 => (self.status_last(run, n).await?, None),
            // Live only: follow on from the newest entry there is now.
            _ => (Vec::new(), self.status_last(run, 1).await?.pop()),
        };
        let last = replayed
            .last()
            .or(position.as_ref())
            .map_or(Some(StreamId::ZERO), id_of)
            .ok_or_else(|| unexpected("stream id"))?;
        Ok((replayed, last))
    }

    /// What was published after `last` while the listener was away, and
    /// whether that is all of it (`false` when some may have been trimmed
    /// first).
    ///
    /// The stream is read first and judged after, so nothing trimmed
    /// between the two can pass unnoticed: a stream is trimmed from its
    /// oldest end only, so `last` still being there after the read means
    /// nothing after it was trimmed before the read (and what comes after
    /// the read is heard live). `last` gone while newer entries are there
    /// means the entries right after it may have gone too: that is reported
    /// as incomplete, even when the first one left happens to be its
    /// successor, since ids alone cannot tell. `last` gone with nothing
    /// newer (a quiet run whose last message aged out) misses nothing, as
    /// long as the stream is there: trimming leaves an empty stream, but a
    /// `delete_run` deletes it whole, with whatever was published after
    /// `last` (the first page is read in one transaction with `EXISTS`, so
    /// a message published right after the read cannot make a deleted
    /// stream look kept). A subscriber that has heard no message since it
    /// started on an empty stream, or since a deletion was reported
    /// (`last` is zero), cannot tell a stream deleted meanwhile from one
    /// that never was, the common case of a run that never published: it
    /// gets no `Resync` for it.
    async fn status_gap(&self, run: &RunId, last: StreamId) -> Result<(Vec<StatusMessage>, bool)> {
        if last == StreamId::ZERO {
            // The stream was empty when the subscription started: complete
            // unless the stream ever lost an entry.
            let missed = self.status_after(run, last).await?;
            let complete = missed.is_empty() || self.status_untrimmed(run).await?;
            return Ok((missed, complete));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(self.page_request(run, &format!("({last}"), PAGE))
            .cmd("EXISTS")
            .arg(self.keys.status(run));
        let mut con = self.conn.clone();
        let (first, there): (Value, bool) = self.bounded(pipe.query_async(&mut con)).await?;
        let mut missed = entries(first)?;
        if missed.is_empty() {
            return Ok((missed, there));
        }
        if missed.len() == PAGE {
            let after = missed
                .last()
                .and_then(id_of)
                .ok_or_else(|| unexpected("stream id"))?;
            missed.extend(self.status_after(run, after).await?);
        }
        // `XRANGE last last`: that very entry (an inclusive start alone
        // would also return any entry after it).
        let at = last.to_string();
        let mut con = self.conn.clone();
        let value: Value = self
            .bounded(
                redis::cmd("XRANGE")
                    .arg(self.keys.status(run))
                    .arg(&at)
                    .arg(&at)
                    .query_async(&mut con),
            )
            .await?;
        let still_there = entries(value)?
            .first()
            .and_then(id_of)
            .is_some_and(|id| id == last);
        Ok((missed, still_there))
    }

    /// Whether the run's stream never lost an entry: `XINFO STREAM`'s
    /// `entries-added` (every entry ever appended, Redis 7.0 and later)
    /// equals its `length`. `false` when the server does not say (older
    /// servers) or the stream is gone. A stream that was already trimmed
    /// before the subscription started also answers `false`: that errs on
    /// the side of a `Resync`.
    async fn status_untrimmed(&self, run: &RunId) -> Result<bool> {
        let mut con = self.conn.clone();
        let value: Value = self
            .bounded(
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(self.keys.status(run))
                    .query_async(&mut con),
            )
            .await?;
        let (added, length) = (
            stream_info(&value, "entries-added"),
            stream_info(&value, "length"),
        );
        Ok(matches!((added, length), (Some(a), Some(l)) if a == l))
    }
}

/// One integer field of an `XINFO STREAM` reply (a flat array of names
/// and values in RESP2, a map in RESP3).
fn stream_info(value: &Value, field: &str) -> Option<i64> {
    let named = |name: &Value| {
        matches!(name, Value::BulkString(b) if b == field.as_bytes())
            || matches!(name, Value::SimpleString(s) if s == field)
    };
    let found = match value {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.first().is_some_and(named))
            .and_then(|pair| pair.get(1)),
        Value::Map(pairs) => pairs.iter().find(|(k, _)| named(k)).map(|(_, v)| v),
        _ => None,
    };
    match found? {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// Follows one status subscription: delivers the replay, then the messages
/// the listener hears that are newer than the last one delivered, and
/// fills the gap after a reconnect from the stream.
pub(crate) async fn follow(
    inner: Arc<Inner>,
    run: RunId,
    membership: Membership,
    mut notes: mpsc::UnboundedReceiver<Note>,
    mut sender: FeedSender<StatusEvent>,
    replayed: Vec<StatusMessage>,
    mut last: StreamId,
) {
    let _membership = membership;
    for message in replayed {
        if !sender.send(StatusEvent::Message(message)) {
            return;
        }
    }
    loop {
        let note = tokio::select! {
            note = notes.recv() => note,
            () = sender.closed() => return,
        };
        let delivered = match note {
            Some(Note::Status(message)) => match id_of(&message) {
                Some(id) if id.cmp(&last) == Ordering::Greater => {
                    last = id;
                    sender.send(StatusEvent::Message(message))
                }
                Some(_) => true,
                None => sender.resync(),
            },
            Some(Note::Reconnected) => match inner.status_gap(&run, last).await {
                Ok((missed, complete)) => {
                    if missed.is_empty() && !complete {
                        // The stream is gone (the run deleted): follow on
                        // from its start, or every later reconnect would
                        // report the same gap again.
                        last = StreamId::ZERO;
                    }
                    let mut open = complete || sender.resync();
                    for message in missed {
                        if let Some(id) = id_of(&message) {
                            last = last.max(id);
                        }
                        open = open && sender.send(StatusEvent::Message(message));
                    }
                    open
                }
                Err(error) => {
                    tracing::debug!(%error, run = %run, "status gap after a reconnect unreadable");
                    sender.resync()
                }
            },
            Some(Note::Event(_)) => true,
            Some(Note::Refused(refusal)) => {
                sender.fail(map_redis_error(refusal).at_run(Operation::Subscribe, &run));
                return;
            }
            None => {
                sender.fail(listener::stopped().at_run(Operation::Subscribe, &run));
                return;
            }
        };
        if !delivered {
            return;
        }
    }
}

/// A milestone's time as WEPPcloud writes it: epoch seconds, with the
/// fraction (up to nanoseconds, trailing zeros dropped) when there is one.
///
/// # Errors
/// `InvalidArgument` for a time before 1970.
pub(crate) fn format_timestamp(at: SystemTime) -> Result<String> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            "a milestone cannot be dated before 1970",
        )
        .with_backend(BACKEND)
    })?;
    let nanos = since.subsec_nanos();
    if nanos == 0 {
        return Ok(since.as_secs().to_string());
    }
    let fraction = format!("{nanos:09}");
    Ok(format!(
        "{}.{}",
        since.as_secs(),
        fraction.trim_end_matches('0')
    ))
}

/// Reads a milestone's time: whole or fractional epoch seconds (digits
/// past nanoseconds are dropped). `None` for anything else.
pub(crate) fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    let nanos: u32 = digits.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// The milestones and attributes in a run's hash (its fields and values).
pub(crate) fn milestones_of(fields: Vec<(String, String)>) -> Milestones {
    let mut milestones = Milestones::default();
    for (field, value) in fields {
        if let Some(task) = field.strip_prefix("timestamps:") {
            match parse_timestamp(&value) {
                Some(at) => {
                    milestones.timestamps.insert(task.to_owned(), at);
                }
                None => tracing::debug!(task, "unreadable milestone time ignored"),
            }
        } else if let Some(name) = field.strip_prefix("attrs:") {
            milestones.attrs.insert(name.to_owned(), value);
        }
    }
    milestones
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_as_the_server_does() {
        let a = StreamId::parse("1795000000000-9").unwrap();
        let b = StreamId::parse("1795000000001-0").unwrap();
        assert!(a < b);
        assert!(StreamId::ZERO < a);
        assert_eq!(a.to_string(), "1795000000000-9");
        assert_eq!(StreamId::parse("12"), None);
        assert_eq!(StreamId::parse("a-1"), None);
    }

    #[test]
    fn timestamps_round_trip_as_weppcloud_writes_them() {
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(format_timestamp(whole).unwrap(), "1795000000");
        let fine = whole + Duration::from_micros(250_500);
        assert_eq!(format_timestamp(fine).unwrap(), "1795000000.2505");
        for at in [whole, fine, whole + Duration::from_nanos(1)] {
            assert_eq!(parse_timestamp(&format_timestamp(at).unwrap()), Some(at));
        }
        // Python's time.time() as WEPPcloud stores it.
        assert_eq!(
            parse_timestamp("1795000000.1234567891"),
            Some(whole + Duration::from_nanos(123_456_789))
        );
        for bad in ["", ".5", "-1", "1e9", "12a", "1.2.3", "nan"] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
        assert_eq!(
            format_timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(1))
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn milestones_read_weppcloud_fields_only() {
        let got = milestones_of(vec![
            ("timestamps:build_climate".into(), "1795000000.5".into()),
            ("attrs:has_sbs".into(), "false".into()),
            ("locked:climate.nodb".into(), "true".into()),
            ("timestamps:broken".into(), "soon".into()),
        ]);
        assert_eq!(got.timestamps.len(), 1);
        assert_eq!(
            got.timestamps["build_climate"],
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_500)
        );
        assert_eq!(got.attrs.len(), 1);
        assert_eq!(got.attrs["has_sbs"], "false");
    }

    #[test]
    fn reads_stream_entries() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("5-1"),
            Value::Array(vec![
                bulk("topic"),
                bulk("climate"),
                bulk("text"),
                bulk("step 2"),
                bulk("at"),
                bulk("1795000000123"),
            ]),
        ])]);
        let got = entries(reply).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (
                got[0].id.as_str(),
                got[0].topic.as_str(),
                got[0].text.as_str()
            ),
            ("5-1", "climate", "step 2")
        );
        assert_eq!(got[0].at, from_unix_millis(1_795_000_000_123));
        assert!(entries(Value::Array(vec![bulk("x")])).is_err());
    }
}
