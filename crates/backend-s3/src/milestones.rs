//! The milestones object of a run, and how its timestamps are written.
//!
//! One small JSON object per run, `<prefix>/.runstate/milestones/<run>.json`:
//!
//! ```json
//! {"v":1,"timestamps":{"build_climate":"1795000000.123456789"},"attrs":{"has_sbs":"false"}}
//! ```
//!
//! Timestamps are epoch seconds with up to nine decimals, as text, so a
//! `SystemTime` comes back exactly (a JSON number would round it to a
//! fraction of a microsecond). The object is changed only by
//! compare-and-swap writes (see [`S3Store::mark`](crate::S3Store)).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::{ObjectStoreExt, PutMode as OsPutMode};
use runstate_core::{Bytes, Error, ErrorKind, Milestones, Result, RunId};
use serde::{Deserialize, Serialize};

use crate::{BACKEND, Inner, MILESTONE_TRIES};

/// The body of a milestones object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MilestonesBody {
    pub(crate) v: u32,
    #[serde(default)]
    pub(crate) timestamps: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) attrs: BTreeMap<String, String>,
    /// The nonces of the last [`RECENT_WRITES`] changes, oldest first:
    /// each change carries forward those of the object it read, so a
    /// change that finds its own nonce here knows it was applied (see
    /// [`Inner::change_milestones`]). Older versions of this backend
    /// ignore the field and drop it when they write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) recent: Vec<String>,
}

/// How many change nonces a milestones object remembers: far more changes
/// than can come between a write whose reply was lost and its next read.
const RECENT_WRITES: usize = 64;

fn corrupt(message: String) -> Error {
    Error::new(ErrorKind::Corrupt, message).with_backend(BACKEND)
}

impl MilestonesBody {
    /// An empty body of the current format.
    pub(crate) fn new() -> Self {
        MilestonesBody {
            v: 1,
            ..Self::default()
        }
    }

    /// Parses a stored object.
    ///
    /// # Errors
    /// `Corrupt` when it is not a milestones object of a known format.
    pub(crate) fn decode(bytes: &[u8], path: &str) -> Result<Self, Error> {
        let body: MilestonesBody = serde_json::from_slice(bytes).map_err(|e| {
            corrupt(format!("milestones object {path} is not valid JSON")).with_source(e)
        })?;
        if body.v != 1 {
            return Err(corrupt(format!(
                "milestones object {path} has unknown format version {}",
                body.v
            )));
        }
        Ok(body)
    }

    /// The object's bytes.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding milestones")
                .with_backend(BACKEND)
                .with_source(e)
        })
    }

    /// What the object says, timestamps parsed.
    ///
    /// # Errors
    /// `Corrupt` for a timestamp that is not `secs[.fraction]`.
    pub(crate) fn to_milestones(&self, path: &str) -> Result<Milestones, Error> {
        let mut out = Milestones::default();
        for (task, text) in &self.timestamps {
            let at = parse_time(text).ok_or_else(|| {
                corrupt(format!(
                    "milestones object {path}: timestamp of {task:?} is not epoch seconds"
                ))
            })?;
            out.timestamps.insert(task.clone(), at);
        }
        out.attrs = self.attrs.clone();
        Ok(out)
    }
}

/// `at` as epoch seconds with nanoseconds, as text; `None` before 1970.
pub(crate) fn format_time(at: SystemTime) -> Option<String> {
    let since = at.duration_since(UNIX_EPOCH).ok()?;
    Some(match since.subsec_nanos() {
        0 => since.as_secs().to_string(),
        nanos => {
            let fraction = format!("{nanos:09}");
            format!("{}.{}", since.as_secs(), fraction.trim_end_matches('0'))
        }
    })
}

/// The inverse of [`format_time`] (up to nine decimals).
pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (secs, fraction) = match text.split_once('.') {
        Some((secs, fraction)) if digits(fraction) && fraction.len() <= 9 => (secs, fraction),
        Some(_) => return None,
        None => (text, ""),
    };
    if !digits(secs) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().ok()?
    };
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

impl Inner {
    /// The milestones object of a run: its ETag and body, `None` when the
    /// run has none.
    pub(crate) async fn read_milestones(
        &self,
        run: &RunId,
    ) -> Result<Option<(String, MilestonesBody)>> {
        let path = self.milestones_path(run);
        let Some(got) = self.found(self.store.get(&path)).await? else {
            return Ok(None);
        };
        let etag = got.meta.e_tag.clone().ok_or_else(|| {
            Error::new(ErrorKind::Backend, "the server returned no ETag").with_backend(BACKEND)
        })?;
        let bytes = self.bounded(got.bytes()).await?;
        Ok(Some((etag, MilestonesBody::decode(&bytes, path.as_ref())?)))
    }

    /// Applies `change` to the run's milestones object by compare-and-swap:
    /// read it (with its ETag), change the one field, write it back
    /// conditional on that ETag (`If-None-Match: *` when there was none),
    /// and start again when the write is refused because someone changed
    /// another field meanwhile. So concurrent changes of different fields
    /// never lose one, and no lock is taken. `change` returns whether it
    /// changed anything: a field that already holds the value needs no
    /// write (which also makes a retry after a lost reply cheap).
    ///
    /// Every try of one change carries the same nonce, kept in the object
    /// with the nonces of the changes before it (`recent`). A try that was
    /// applied although its reply was lost (S3 answered 5xx, and
    /// object_store's retry got `412`) is found by its nonce at the next
    /// read and not made again: made again, it would undo a change of the
    /// same field another writer made after it. A write whose outcome is
    /// still unknown after reading back (a timeout, a 5xx after retries,
    /// and the nonce not there) fails the call with a retryable error.
    pub(crate) async fn change_milestones(
        &self,
        run: &RunId,
        change: impl Fn(&mut MilestonesBody) -> bool,
    ) -> Result<()> {
        self.require_conditional()?;
        let path = self.milestones_path(run);
        let nonce = crate::leases::write_nonce();
        let applied = |body: &MilestonesBody| body.recent.contains(&nonce);
        let mut pause = Duration::from_millis(4);
        for _ in 0..MILESTONE_TRIES {
            let (mode, mut body) = match self.read_milestones(run).await? {
                None => (OsPutMode::Create, MilestonesBody::new()),
                Some((etag, body)) => (Self::if_match(&etag), body),
            };
            if applied(&body) || !change(&mut body) {
                return Ok(());
            }
            body.recent.push(nonce.clone());
            let excess = body.recent.len().saturating_sub(RECENT_WRITES);
            body.recent.drain(..excess);
            match self
                .put_object(&path, Bytes::from(body.encode()?), mode)
                .await
            {
                Ok(_) => return Ok(()),
                // Another field changed (or the object was created or
                // deleted) since the read, or a try of this change was
                // applied and its reply lost: read again.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Precondition | ErrorKind::AlreadyExists | ErrorKind::NotFound
                    ) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Backend | ErrorKind::Timeout) => {
                    return match self.read_milestones(run).await {
                        Ok(Some((_, body))) if applied(&body) => Ok(()),
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
            // Jittered, growing pauses, so that many workers marking one
            // run at once do not collide in lockstep.
            tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Err(Error::new(
            ErrorKind::Backend,
            format!(
                "the run's milestones kept changing: {MILESTONE_TRIES} compare-and-swap tries lost"
            ),
        )
        .with_backend(BACKEND)
        .set_retryable(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_exactly() {
        for at in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789),
            UNIX_EPOCH + Duration::new(1_795_000_000, 500_000_000),
            UNIX_EPOCH + Duration::new(1, 1),
            SystemTime::now(),
        ] {
            let text = format_time(at).expect("after the epoch");
            assert_eq!(parse_time(&text), Some(at), "{text}");
        }
        assert_eq!(
            format_time(UNIX_EPOCH + Duration::new(1_795_000_000, 500_000_000)).as_deref(),
            Some("1795000000.5")
        );
        assert_eq!(format_time(UNIX_EPOCH - Duration::from_secs(1)), None);
    }

    #[test]
    fn bad_times_are_refused() {
        for text in [
            "",
            ".",
            "1.",
            ".5",
            "-1",
            "1.2.3",
            "1e9",
            "1.1234567890",
            " 1",
            "x",
        ] {
            assert_eq!(parse_time(text), None, "{text:?}");
        }
        assert_eq!(
            parse_time("1795000000.25"),
            Some(UNIX_EPOCH + Duration::new(1_795_000_000, 250_000_000))
        );
    }

    #[test]
    fn unknown_formats_are_corrupt() {
        let err = MilestonesBody::decode(br#"{"v":2}"#, "p").expect_err("v2");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let err = MilestonesBody::decode(b"not json", "p").expect_err("garbage");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let body = MilestonesBody::decode(br#"{"v":1}"#, "p").expect("minimal");
        assert_eq!(body, MilestonesBody::new());
        let mut bad = MilestonesBody::new();
        bad.timestamps.insert("t".into(), "soon".into());
        let err = bad.to_milestones("p").expect_err("bad time");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }
}
