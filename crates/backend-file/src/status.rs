//! Status messages: an append-only JSON-lines log per run, in its
//! bookkeeping folder.
//!
//! ```text
//! <root>/<run>/.runstate/status.log     the current log, one message per line
//! <root>/<run>/.runstate/status.log.1   the previous log, kept for replay
//! <root>/<run>/.runstate/status.seq     {"next":N,"first":F}: the next id, and the first id of the current log
//! ```
//!
//! A line is one JSON object, `{"id":17,"topic":"climate","text":"…","at":1795000007.25}`
//! (`at`: the publisher's clock, epoch seconds). Ids count up from 1 per
//! run and never repeat: the counter lives in `status.seq`, whose `flock`
//! a publisher holds (exclusively, with the bounded wait of lease records)
//! while it takes an id, rotates the log if it is full, and appends its
//! line with **one** `write` on a descriptor opened with `O_APPEND`, so a
//! line is never torn or interleaved with another, whoever else appends.
//! The counter is written before the line, so a publisher killed between
//! the two leaves a skipped id, never a repeated one. A lost or unreadable
//! counter is recovered from the largest id in the logs.
//!
//! **Rotation.** Once the current log holds the configured number of
//! messages or bytes (`status_messages`, `status_bytes`), it is renamed to
//! `status.log.1` (replacing the one before) and a new log is started,
//! under the same lock: the history holds the previous and the current
//! log. Logs are not `fsync`ed: a status message is progress information,
//! and one lost to an OS crash is only missing from the replay.
//!
//! **Reading.** A subscription opens both logs under a shared lock of the
//! counter (so it never sees half a rotation), replays what it was asked
//! for, and then follows the current log from where it stopped: woken by
//! inotify on the bookkeeping folder and, as a fallback (another host of a
//! shared file system, a lost event), every poll interval. It reads only
//! whole lines; on a rotation it finishes the log it holds (complete: the
//! rotation waited for its appends), reads the previous log if that is a
//! generation it never saw, and goes on with the new one. Ids tell it when
//! it missed messages (it fell more than a whole log behind, a publisher
//! died mid-way, the history was removed): it then delivers `Resync`.
//! Nothing is created for reading: a run without a bookkeeping folder is
//! looked for every poll interval until a publisher creates it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use runstate_core::{Error, ErrorKind, RunId, StatusMessage};
use serde::{Deserialize, Serialize};

use crate::BACKEND;
use crate::folder::{Access, Folder};
use crate::layout::io_error;
use crate::leases::lock_bounded;

/// The current log.
pub(crate) const LOG: &str = "status.log";
/// The previous log.
pub(crate) const PREVIOUS: &str = "status.log.1";
/// The id counter, whose `flock` serializes publishers.
pub(crate) const SEQ: &str = "status.seq";

/// Largest counter file read.
const MAX_SEQ: u64 = 4096;
/// Most bytes read from a log in one go; a line longer than this (only a
/// foreign file could hold one) is skipped.
const READ_CHUNK: u64 = 8 << 20;
/// Most bytes of a log read from one offset: a log past it (a foreign
/// file, or a sparse giant; runstate rotates its logs at the history's
/// size, 1 MiB by default) is read from its last `MAX_LOG_READ` bytes,
/// from the first whole line there. A history set larger than this is
/// replayed from its last 256 MiB (with `Resync` before them).
const MAX_LOG_READ: u64 = 256 << 20;

/// Whether a changed entry of the bookkeeping folder concerns the status
/// log.
pub(crate) fn is_status_file(name: &str) -> bool {
    name.starts_with("status.")
}

#[derive(Serialize)]
struct LineOut<'a> {
    id: u64,
    topic: &'a str,
    text: &'a str,
    at: f64,
}

#[derive(Deserialize)]
struct LineIn {
    id: u64,
    topic: String,
    text: String,
    #[serde(default)]
    at: f64,
}

/// A message read from a log, with its id as a number.
struct Line {
    id: u64,
    message: StatusMessage,
}

impl LineIn {
    fn into_line(self) -> Line {
        let at = Duration::try_from_secs_f64(self.at)
            .ok()
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Line {
            id: self.id,
            message: StatusMessage::new(self.id.to_string(), self.topic, self.text, at),
        }
    }
}

/// The counter, as stored.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Seq {
    /// The id the next message gets.
    next: u64,
    /// The id of the first message of the current log.
    first: u64,
}

/// The counter file, locked.
struct SeqFile {
    file: File,
    path: PathBuf,
    len: usize,
    seq: Option<Seq>,
}

impl SeqFile {
    fn open(book: &Folder, wait: Duration) -> Result<SeqFile, Error> {
        let path = book.child(SEQ);
        let file = book.open_file(SEQ, Access::Create)?.ok_or_else(|| {
            Error::new(ErrorKind::Backend, "a created counter file was not there")
                .with_backend(BACKEND)
        })?;
        lock_bounded(&file, true, wait, &path)?;
        let mut text = vec![0u8; MAX_SEQ as usize];
        let n = read_at_most(&file, &mut text, 0).map_err(|e| io_error("reading", &path, e))?;
        text.truncate(n);
        let trimmed = text.trim_ascii();
        let seq = (!trimmed.is_empty())
            .then(|| serde_json::from_slice::<Seq>(trimmed).ok())
            .flatten()
            .filter(|s| s.next > 0);
        if seq.is_none() && !trimmed.is_empty() {
            tracing::warn!(path = %path.display(), "unreadable status counter; recovering it from the logs");
        }
        Ok(SeqFile {
            file,
            path,
            len: n,
            seq,
        })
    }

    /// Writes the counter back in place with one `pwrite`, padded over a
    /// longer previous content.
    fn write(&mut self, seq: Seq) -> Result<(), Error> {
        let mut text = serde_json::to_vec(&seq).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding the status counter failed")
                .with_backend(BACKEND)
                .with_source(e)
        })?;
        text.push(b'\n');
        let written = text.len();
        text.resize(written.max(self.len), b' ');
        self.file
            .write_all_at(&text, 0)
            .map_err(|e| io_error("writing the status counter", &self.path, e))?;
        self.len = text.len();
        self.seq = Some(seq);
        Ok(())
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the whole lines of `file` from `offset`: the messages, and the
/// offset after the last whole line (a line still being written, without
/// its newline yet, is left for the next read). Lines that are not
/// messages are skipped.
fn read_lines(
    file: &File,
    path: &std::path::Path,
    mut offset: u64,
) -> Result<(Vec<Line>, u64), Error> {
    let mut lines = Vec::new();
    let size = file
        .metadata()
        .map_err(|e| io_error("stat of the status log", path, e))?
        .len();
    if size.saturating_sub(offset) > MAX_LOG_READ {
        // Past any log runstate writes: only its tail is read, from its
        // first whole line (a reader whose ids skip gets `Resync`).
        let tail = size - MAX_LOG_READ;
        tracing::warn!(path = %path.display(), size, "a status log past any runstate writes: reading its tail only");
        let mut probe = vec![0u8; usize::try_from(READ_CHUNK).unwrap_or(usize::MAX)];
        let n = read_at_most(file, &mut probe, tail)
            .map_err(|e| io_error("reading the status log", path, e))?;
        offset = match probe[..n].iter().position(|&b| b == b'\n') {
            Some(end) => tail + end as u64 + 1,
            None => tail + n as u64,
        };
    }
    loop {
        let size = file
            .metadata()
            .map_err(|e| io_error("stat of the status log", path, e))?
            .len();
        if size <= offset {
            return Ok((lines, offset));
        }
        let want = (size - offset).min(READ_CHUNK);
        let mut buf = vec![0u8; usize::try_from(want).unwrap_or(usize::MAX)];
        let n = read_at_most(file, &mut buf, offset)
            .map_err(|e| io_error("reading the status log", path, e))?;
        buf.truncate(n);
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            if n as u64 == READ_CHUNK {
                // A "line" longer than any message: not ours; skip it.
                tracing::warn!(path = %path.display(), offset, "skipping an overlong line of the status log");
                offset += n as u64;
                continue;
            }
            // Nothing, or a line still being written.
            return Ok((lines, offset));
        };
        for raw in buf[..end].split(|&b| b == b'\n') {
            if raw.trim_ascii().is_empty() {
                continue;
            }
            match serde_json::from_slice::<LineIn>(raw) {
                Ok(line) => lines.push(line.into_line()),
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "skipping a line of the status log that is not a message");
                }
            }
        }
        offset += end as u64 + 1;
    }
}

/// The largest id and the first id of the current log found in the logs,
/// for a lost counter.
fn recover(book: &Folder) -> Result<Seq, Error> {
    let mut last = 0;
    let mut first_current = None;
    for name in [PREVIOUS, LOG] {
        if let Some(file) = book.open_file(name, Access::Read)? {
            let (lines, _) = read_lines(&file, &book.child(name), 0)?;
            if name == LOG {
                first_current = lines.first().map(|l| l.id);
            }
            last = lines.iter().map(|l| l.id).fold(last, u64::max);
        }
    }
    let next = last.checked_add(1).ok_or_else(counter_at_end)?;
    Ok(Seq {
        next,
        first: first_current.unwrap_or(next),
    })
}

/// The error of a message counter (or a log's last id) at its end: not
/// written by runstate, which counts one a message from 1.
fn counter_at_end() -> Error {
    Error::new(
        ErrorKind::Corrupt,
        "the run's status counter is at its end (not runstate's); nothing was published",
    )
    .with_backend(BACKEND)
}

fn epoch_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How much history a run keeps: the current log is rotated once it holds
/// this many messages or bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct History {
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
}

/// Appends one message to the log of the bookkeeping folder `book`.
pub(crate) fn publish(
    book: &Folder,
    topic: &str,
    text: &str,
    at: SystemTime,
    history: History,
    wait: Duration,
) -> Result<(), Error> {
    let mut counter = SeqFile::open(book, wait)?;
    let mut seq = match counter.seq {
        Some(seq) => seq,
        None => recover(book)?,
    };
    let id = seq.next;
    let mut line = serde_json::to_vec(&LineOut {
        id,
        topic,
        text,
        at: epoch_seconds(at),
    })
    .map_err(|e| {
        Error::new(ErrorKind::Backend, "encoding a status message failed")
            .with_backend(BACKEND)
            .with_source(e)
    })?;
    line.push(b'\n');
    let current = match book.open_file(LOG, Access::Read)? {
        Some(file) => {
            let size = file
                .metadata()
                .map_err(|e| io_error("stat of the status log", &book.child(LOG), e))?
                .len();
            // A publisher killed in the middle of its write (a line of
            // several pages) left a partial line: ended first, so this
            // message is a line of its own and not lost with it.
            let mut last = [0u8; 1];
            if size > 0
                && read_at_most(&file, &mut last, size - 1)
                    .map_err(|e| io_error("reading the status log", &book.child(LOG), e))?
                    == 1
                && last[0] != b'\n'
            {
                line.insert(0, b'\n');
            }
            Some(size)
        }
        None => None,
    };
    match current {
        Some(size)
            if size > 0
                && (size.saturating_add(line.len() as u64) > history.bytes
                    || id.saturating_sub(seq.first) >= history.messages) =>
        {
            book.rename(LOG, PREVIOUS)
                .map_err(|e| io_error("rotating the status log", &book.child(LOG), e))?;
            seq.first = id;
        }
        Some(_) => {}
        None => seq.first = id,
    }
    seq.next = id.checked_add(1).ok_or_else(counter_at_end)?;
    // The id is taken before the line is written: a publisher killed in
    // between leaves a gap, never a repeated id.
    counter.write(seq)?;
    let mut log = book.open_append(LOG)?;
    // One write: with O_APPEND the whole line lands at the end at once.
    let written = log
        .write(&line)
        .map_err(|e| io_error("appending to the status log", &book.child(LOG), e))?;
    if written != line.len() {
        // Only a full disk or a file size limit cuts a write short: end
        // the partial line, so the next one starts on a line of its own.
        let _ = log.write(b"\n");
        return Err(Error::new(
            ErrorKind::Backend,
            format!(
                "appending to {} wrote {written} of {} bytes",
                book.child(LOG).display(),
                line.len()
            ),
        )
        .with_backend(BACKEND));
    }
    Ok(())
}

/// A log being followed.
struct Current {
    file: File,
    ino: u64,
    offset: u64,
}

/// What a subscription reads next.
pub(crate) enum Item {
    /// A message.
    Message(StatusMessage),
    /// Messages were missed before the next one.
    Gap,
}

/// Where a subscription is in a run's logs.
#[derive(Default)]
pub(crate) struct Follower {
    /// The log being read, once there is one.
    current: Option<Current>,
    /// The id of the last message read (delivered or not), or the last id
    /// handed out when the subscription began: ids after it are new.
    last_id: Option<u64>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

fn ino(file: &File, path: &std::path::Path) -> Result<u64, Error> {
    file.metadata()
        .map(|m| m.ino())
        .map_err(|e| io_error("stat of the status log", path, e))
}

/// The counter, the previous log and the current log, as opened.
type Logs = (Option<Seq>, Option<File>, Option<File>);

/// The counter (if it is readable), the previous log and the current log,
/// opened under a shared lock of the counter so that no rotation is seen
/// half done. Nothing is created: without a counter nobody has published
/// yet (or it was lost: the logs are opened as they are).
fn open_logs(book: &Folder, wait: Duration) -> Result<Logs, Error> {
    let counter = book.open_file(SEQ, Access::Read)?;
    let mut seq = None;
    if let Some(counter) = &counter {
        lock_bounded(counter, false, wait, &book.child(SEQ))?;
        let mut text = vec![0u8; MAX_SEQ as usize];
        let n = read_at_most(counter, &mut text, 0)
            .map_err(|e| io_error("reading", &book.child(SEQ), e))?;
        seq = serde_json::from_slice::<Seq>(text[..n].trim_ascii()).ok();
    }
    Ok((
        seq,
        book.open_file(PREVIOUS, Access::Read)?,
        book.open_file(LOG, Access::Read)?,
    ))
}

impl Follower {
    /// Opens the history of the bookkeeping folder `book` (if there is
    /// one): the follower positioned after it, and its messages, oldest
    /// first.
    pub(crate) fn start(
        book: Option<&Folder>,
        wait: Duration,
    ) -> Result<(Follower, Vec<StatusMessage>), Error> {
        let mut follower = Follower {
            // Nothing published yet: every message to come is new.
            last_id: Some(0),
            ..Follower::default()
        };
        let Some(book) = book else {
            return Ok((follower, Vec::new()));
        };
        let (seq, previous, current) = open_logs(book, wait)?;
        let mut history = Vec::new();
        if let Some(file) = &previous {
            history.extend(read_lines(file, &book.child(PREVIOUS), 0)?.0);
        }
        if let Some(file) = current {
            let (lines, offset) = read_lines(&file, &book.child(LOG), 0)?;
            history.extend(lines);
            follower.current = Some(Current {
                ino: ino(&file, &book.child(LOG))?,
                file,
                offset,
            });
        }
        follower.last_id = history
            .last()
            .map(|l| l.id)
            .or(seq.map(|s| s.next.saturating_sub(1)))
            .or(Some(0));
        Ok((follower, history.into_iter().map(|l| l.message).collect()))
    }

    /// Takes in the lines of one log: those after the last id seen, with a
    /// gap marked where ids were skipped. A current log opened anew
    /// (`fresh`: after a rotation) that starts at or below the last id seen
    /// means the history was removed and begun again: a gap, then all of
    /// it.
    fn accept(&mut self, lines: Vec<Line>, mut fresh: bool, items: &mut Vec<Item>) {
        for line in lines {
            if fresh {
                fresh = false;
                if self.last_id.is_some_and(|last| last > 0 && line.id <= last) {
                    items.push(Item::Gap);
                    self.last_id = None;
                }
            }
            if let Some(last) = self.last_id {
                if line.id <= last {
                    continue;
                }
                if line.id > last + 1 {
                    items.push(Item::Gap);
                }
            }
            self.last_id = Some(line.id);
            items.push(Item::Message(line.message));
        }
    }

    /// Reads the previous log (`file`, opened): the messages in it that
    /// this follower has not read (none when it is the log this follower
    /// held until a rotation; all of a generation it never saw, when it
    /// fell more than one rotation behind). Told apart by ids, not inode
    /// numbers, which the file system reuses.
    fn read_previous(
        &mut self,
        book: &Folder,
        file: Option<File>,
        items: &mut Vec<Item>,
    ) -> Result<(), Error> {
        if let Some(file) = file {
            let (lines, _) = read_lines(&file, &book.child(PREVIOUS), 0)?;
            self.accept(lines, false, items);
        }
        Ok(())
    }

    /// The messages appended since the last call, following rotations.
    pub(crate) fn poll(&mut self, book: &Folder, wait: Duration) -> Result<Vec<Item>, Error> {
        let mut items = Vec::new();
        let path = book.child(LOG);
        let mut fresh = false;
        if self.current.is_none() {
            // Nothing held yet (no log when the subscription began, or the
            // log went away): the previous log, then the current one.
            let (_, previous, current) = open_logs(book, wait)?;
            self.read_previous(book, previous, &mut items)?;
            let Some(file) = current else {
                return Ok(items);
            };
            self.current = Some(Current {
                ino: ino(&file, &path)?,
                file,
                offset: 0,
            });
            fresh = true;
        }
        loop {
            let Some(current) = &mut self.current else {
                return Ok(items);
            };
            let (lines, offset) = read_lines(&current.file, &path, current.offset)?;
            current.offset = offset;
            let held = current.ino;
            self.accept(lines, fresh, &mut items);
            let named = book
                .ino_of(LOG)
                .map_err(|e| io_error("stat of the status log", &path, e))?;
            match named {
                // Still the current log; or none, between a rotation's
                // rename and its first append: looked at again next time.
                Some(ino) if ino == held => return Ok(items),
                None => return Ok(items),
                Some(_) => {}
            }
            // Rotated: what was appended to the log held here is complete
            // (a rotation waits for every append to it); read the rest.
            if let Some(current) = &mut self.current {
                let (lines, _) = read_lines(&current.file, &path, current.offset)?;
                self.accept(lines, false, &mut items);
            }
            self.current = None;
            // A generation this follower never saw, when it fell more than
            // one rotation behind.
            let previous = book.open_file(PREVIOUS, Access::Read)?;
            self.read_previous(book, previous, &mut items)?;
            let Some(file) = book.open_file(LOG, Access::Read)? else {
                return Ok(items);
            };
            self.current = Some(Current {
                ino: ino(&file, &path)?,
                file,
                offset: 0,
            });
            fresh = true;
        }
    }
}

/// The bookkeeping folder of `run` when it exists (never created).
pub(crate) fn existing_book(
    engine: &crate::engine::Engine,
    run: &RunId,
) -> Result<Option<Folder>, Error> {
    engine.existing_book(run)
}
