//! Milestones and attributes of a run, in one small JSON file of its
//! bookkeeping folder:
//!
//! ```text
//! <root>/<run>/.runstate/milestones.json   {"v":1,"timestamps":{"build_climate":"1795000007.25"},"attrs":{"has_sbs":"false"}}
//! <root>/<run>/.runstate/milestones.lock   empty: the flock that serializes changes
//! ```
//!
//! Timestamps are epoch seconds written as decimal strings, exact to the
//! nanosecond (`"1795000007"`, `"1795000007.25"`); a JSON number is
//! accepted when reading. Each change (one milestone or one attribute) is
//! a read-modify-write under an exclusive `flock` on the lock file, taken
//! with the same bounded wait as lease records, and writes the whole file
//! anew through a temporary file, `fsync` and a rename (then an `fsync` of
//! the folder): readers need no lock and see the file before or after a
//! change, never a torn one, and changes of different fields never undo
//! each other. The lock is a file of its own because a rename replaces
//! the file a lock on `milestones.json` would be held on.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use runstate_core::{Error, ErrorKind, Milestones, RunId};
use serde::{Deserialize, Serialize};

use crate::BACKEND;
use crate::engine::Engine;
use crate::folder::{Access, Folder, is_not_found, read_bounded};
use crate::layout::{io_error, temp_name};
use crate::leases::BookLock;

/// The milestones file, in the bookkeeping folder.
pub(crate) const FILE: &str = "milestones.json";
/// The file whose `flock` serializes changes.
pub(crate) const LOCK: &str = "milestones.lock";
/// Largest milestones file read.
const MAX_FILE: u64 = 64 << 20;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    #[serde(default)]
    v: u32,
    #[serde(default)]
    timestamps: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

/// One change.
pub(crate) enum Change<'a> {
    /// `task` finished at this time.
    Mark(&'a str, SystemTime),
    /// Attribute `name` is now `value`.
    Attr(&'a str, &'a str),
}

/// Epoch seconds as an exact decimal string.
fn encode(at: SystemTime) -> Result<String, Error> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            "a milestone before 1970 cannot be recorded",
        )
        .with_backend(BACKEND)
    })?;
    let (secs, nanos) = (since.as_secs(), since.subsec_nanos());
    if nanos == 0 {
        return Ok(secs.to_string());
    }
    let fraction = format!("{nanos:09}");
    Ok(format!("{secs}.{}", fraction.trim_end_matches('0')))
}

/// Reads a timestamp as [`encode`] writes it, or a JSON number of seconds.
fn decode(value: &serde_json::Value) -> Option<SystemTime> {
    let since = match value {
        serde_json::Value::String(text) => {
            let (secs, nanos) = match text.split_once('.') {
                None => (text.as_str(), 0),
                Some((secs, fraction)) => {
                    if fraction.is_empty()
                        || fraction.len() > 9
                        || !fraction.bytes().all(|b| b.is_ascii_digit())
                    {
                        return None;
                    }
                    (secs, format!("{fraction:0<9}").parse().ok()?)
                }
            };
            Duration::new(secs.parse().ok()?, nanos)
        }
        serde_json::Value::Number(n) => Duration::try_from_secs_f64(n.as_f64()?).ok()?,
        _ => return None,
    };
    SystemTime::UNIX_EPOCH.checked_add(since)
}

fn corrupt(book: &Folder, error: serde_json::Error) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "{} is not a milestones file runstate can read; it was left as it is",
            book.child(FILE).display()
        ),
    )
    .with_backend(BACKEND)
    .with_source(error)
}

/// The stored milestones of a bookkeeping folder (`None` when there are
/// none).
fn read(book: &Folder) -> Result<Option<Stored>, Error> {
    let Some(file) = book.open_file(FILE, Access::Read)? else {
        return Ok(None);
    };
    let bytes = read_bounded(&file, &book.child(FILE), MAX_FILE)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| corrupt(book, e))
}

/// Replaces the milestones file: temporary file, `fsync`, rename, `fsync`
/// of the folder.
fn write(book: &Folder, stored: &Stored) -> Result<(), Error> {
    let text = serde_json::to_vec(stored).map_err(|e| {
        Error::new(ErrorKind::Backend, "encoding the milestones failed")
            .with_backend(BACKEND)
            .with_source(e)
    })?;
    let name = temp_name(FILE, false);
    let written = (|| {
        let mut file = book.create_temp(&name, 0o644)?;
        file.write_all(&text)?;
        file.sync_all()?;
        book.rename(&name, FILE)
    })();
    if let Err(error) = written {
        let _ = book.unlink(&name);
        return Err(io_error("writing the milestones", &book.child(FILE), error));
    }
    book.sync()
        .map_err(|e| io_error("fsync of the bookkeeping folder", book.path(), e))
}

/// Takes the exclusive lock serializing changes (creating its file).
fn lock(book: &Folder, wait: Duration) -> Result<BookLock, Error> {
    BookLock::take(book, LOCK, wait)
}

/// Applies one change, creating the run folder and its bookkeeping folder
/// as a save would.
pub(crate) fn change(engine: &Engine, run: &RunId, change: &Change<'_>) -> Result<(), Error> {
    let book = engine.writable_book(run)?;
    let _lock = lock(&book, engine.lock_timeout())?;
    let mut stored = read(&book)?.unwrap_or_default();
    stored.v = 1;
    match change {
        Change::Mark(task, at) => {
            stored
                .timestamps
                .insert((*task).to_owned(), serde_json::Value::String(encode(*at)?));
        }
        Change::Attr(name, value) => {
            stored.attrs.insert((*name).to_owned(), (*value).to_owned());
        }
    }
    write(&book, &stored)
}

/// Every milestone and attribute of `run`; empty when it has none. Creates
/// nothing and takes no lock.
pub(crate) fn read_all(engine: &Engine, run: &RunId) -> Result<Milestones, Error> {
    let mut milestones = Milestones::default();
    let Some(book) = engine.existing_book(run)? else {
        return Ok(milestones);
    };
    let Some(stored) = read(&book)? else {
        return Ok(milestones);
    };
    for (task, value) in stored.timestamps {
        match decode(&value) {
            Some(at) => {
                milestones.timestamps.insert(task, at);
            }
            None => tracing::warn!(
                path = %book.child(FILE).display(),
                %task,
                "skipping a milestone whose time cannot be read"
            ),
        }
    }
    milestones.attrs = stored.attrs;
    Ok(milestones)
}

/// Removes a run's milestones (for `delete_run`), under the lock.
pub(crate) fn remove(book: &Folder, wait: Duration) -> Result<(), Error> {
    if book.open_file(FILE, Access::Read)?.is_none() {
        return Ok(());
    }
    let _lock = lock(book, wait)?;
    match book.unlink(FILE) {
        Ok(()) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(io_error("removing the milestones", &book.child(FILE), e)),
    }
    book.sync()
        .map_err(|e| io_error("fsync of the bookkeeping folder", book.path(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_exactly() {
        for (secs, nanos) in [
            (0, 0),
            (1_795_000_007, 0),
            (1_795_000_007, 250_000_000),
            (1, 1),
        ] {
            let at = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
            let text = encode(at).expect("after 1970");
            assert_eq!(
                decode(&serde_json::Value::String(text.clone())),
                Some(at),
                "{text}"
            );
        }
        assert_eq!(
            encode(SystemTime::UNIX_EPOCH + Duration::new(5, 250_000_000)).expect("encode"),
            "5.25"
        );
        assert_eq!(
            decode(&serde_json::json!(1_795_000_007.5)),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_795_000_007, 500_000_000))
        );
        for bad in ["", "x", "1.", "1.1234567890", "1.-5", "-1"] {
            assert_eq!(decode(&serde_json::json!(bad)), None, "{bad:?}");
        }
        assert!(encode(SystemTime::UNIX_EPOCH - Duration::from_secs(1)).is_err());
    }
}
