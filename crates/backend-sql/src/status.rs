//! Status messages (the bounded history of a run, numbered) and
//! milestones (WEPPcloud's timestamps and attributes of a run).

use std::time::{Duration, SystemTime};

use runstate_core::{Error, ErrorKind, Milestones, Result, RunId, StatusMessage};

use crate::config::Dialect;
use crate::feeds;
use crate::{Inner, P, unexpected};

impl Inner {
    /// Appends a status message to `run`'s history, trimming it to the
    /// configured length, and returns its number.
    pub(crate) async fn publish(&self, run: &RunId, topic: &str, text: &str) -> Result<u64> {
        let at = i64::try_from(runstate_core::time::unix_millis(SystemTime::now())).unwrap_or(0);
        let keep = i64::try_from(self.config.status_history).unwrap_or(i64::MAX);
        let seq = match self.dialect {
            Dialect::Postgres | Dialect::MySql => {
                let row = self
                    .fetch_optional(
                        &self.sql.publish,
                        &[
                            P::T(run.as_str()),
                            P::T(topic),
                            P::T(text),
                            P::I(at),
                            P::I(keep),
                        ],
                    )
                    .await?
                    .ok_or_else(|| unexpected(self.dialect, "no reply to a publish"))?;
                self.get_i64(&row, 0)?
            }
            Dialect::Sqlite => {
                // Status messages commit like lease grants (see
                // `session_setup`): a process crash keeps them.
                let mut tx = self.begin(&self.lease_pool).await?;
                let outcome = async {
                    let row = tx
                        .fetch_optional(&self.sql.status_next, &[P::T(run.as_str())])
                        .await?
                        .ok_or_else(|| unexpected(self.dialect, "no message number"))?;
                    let seq = self.get_i64(&row, 0)?;
                    tx.execute(
                        &self.sql.status_insert,
                        &[
                            P::T(run.as_str()),
                            P::I(seq),
                            P::T(topic),
                            P::T(text),
                            P::I(at),
                        ],
                    )
                    .await?;
                    tx.execute(
                        &self.sql.status_trim,
                        &[P::T(run.as_str()), P::I(seq.saturating_sub(keep))],
                    )
                    .await?;
                    Ok(seq)
                }
                .await;
                tx.finish(outcome).await?
            }
        };
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// `run`'s messages numbered after `after`, in order, at most `limit`.
    pub(crate) async fn status_since(
        &self,
        run: &RunId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StatusMessage)>> {
        let rows = self
            .fetch_all(
                &self.sql.status_since,
                &[
                    P::T(run.as_str()),
                    P::I(i64::try_from(after).unwrap_or(i64::MAX)),
                    P::I(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let seq = u64::try_from(self.get_i64(row, 0)?).unwrap_or(0);
                Ok((
                    seq,
                    feeds::message(
                        seq,
                        self.get_text(row, 1)?,
                        self.get_text(row, 2)?,
                        self.get_i64(row, 3)?,
                    ),
                ))
            })
            .collect()
    }

    /// The number of `run`'s last status message (0 before the first) and
    /// of the oldest one still kept (`None` when none is).
    pub(crate) async fn status_last(&self, run: &RunId) -> Result<(u64, Option<u64>)> {
        let row = self
            .fetch_optional(&self.sql.status_last, &[P::T(run.as_str())])
            .await?;
        Ok(match row {
            Some(row) => (
                u64::try_from(self.get_i64(&row, 0)?).unwrap_or(0),
                self.get_opt_i64(&row, 1)?
                    .map(|oldest| u64::try_from(oldest).unwrap_or(0)),
            ),
            None => (0, None),
        })
    }

    pub(crate) async fn set_milestone(
        &self,
        run: &RunId,
        kind: &str,
        name: &str,
        value: &str,
    ) -> Result<()> {
        self.execute(
            &self.sql.set_milestone,
            &[P::T(run.as_str()), P::T(kind), P::T(name), P::T(value)],
        )
        .await
        .map(drop)
    }

    pub(crate) async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let rows = self
            .fetch_all(&self.sql.milestones, &[P::T(run.as_str())])
            .await?;
        let mut milestones = Milestones::default();
        for row in &rows {
            let (kind, name, value) = (
                self.get_text(row, 0)?,
                self.get_text(row, 1)?,
                self.get_text(row, 2)?,
            );
            match kind.as_str() {
                TIMESTAMPS => {
                    let at = parse_timestamp(&value)
                        .ok_or_else(|| unexpected(self.dialect, "milestone timestamp"))?;
                    milestones.timestamps.insert(name, at);
                }
                ATTRS => {
                    milestones.attrs.insert(name, value);
                }
                // A kind a later version may add.
                _ => {}
            }
        }
        Ok(milestones)
    }
}

/// A milestone's timestamp as stored: seconds since the epoch with nine
/// decimals (what WEPPcloud's `time.time()` strings parse as).
pub(crate) fn timestamp_text(at: SystemTime) -> Result<String> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            "a milestone cannot be dated before 1970",
        )
    })?;
    Ok(format!("{}.{:09}", since.as_secs(), since.subsec_nanos()))
}

/// Parses seconds since the epoch, with any number of decimals.
fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    let secs: u64 = secs.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    let nanos: u32 = digits.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// The milestone kinds, as WEPPcloud names its hash fields' prefixes.
pub(crate) const TIMESTAMPS: &str = "timestamps";
pub(crate) const ATTRS: &str = "attrs";

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use runstate_core::ErrorKind;

    use super::{parse_timestamp, timestamp_text};

    #[test]
    fn timestamps_round_trip_and_parse_weppcloud_strings() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 5);
        let text = timestamp_text(at).expect("after 1970");
        assert_eq!(text, "1795000000.000000005");
        assert_eq!(parse_timestamp(&text), Some(at));
        for (text, expected) in [
            ("1795000100", Some(Duration::from_secs(1_795_000_100))),
            (
                "1795000100.5",
                Some(Duration::from_millis(1_795_000_100_500)),
            ),
            ("1.1234567891", Some(Duration::new(1, 123_456_789))),
            ("", None),
            ("abc", None),
            ("1.-5", None),
            ("-1.5", None),
        ] {
            assert_eq!(
                parse_timestamp(text),
                expected.map(|d| SystemTime::UNIX_EPOCH + d),
                "{text:?}"
            );
        }
        assert_eq!(
            timestamp_text(SystemTime::UNIX_EPOCH - Duration::from_secs(1))
                .expect_err("before 1970")
                .kind(),
            ErrorKind::InvalidArgument
        );
    }
}
