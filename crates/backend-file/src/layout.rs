//! Where things live on disk, how names are made and parsed, and how I/O
//! errors become runstate errors.
//!
//! ```text
//! <root>/<run>/<name>.<ext>              the document, exactly the saved bytes
//! <root>/<run>/.<name>.<ext>.rstmp.…     a save in progress (swept when its writer is dead)
//! <root>/<run>/.runstate/run.lease       lease record of the run lock
//! <root>/<run>/.runstate/doc.<name>.lease lease record of a document lock
//! <root>/<run>/.runstate/records.lock    empty: the flock under which document records are created
//! <root>/<run>/.runstate/docs.index      remembered versions of the documents (a cache)
//! <root>/<run>/.runstate/status.log      status messages (see `crate::status`)
//! <root>/<run>/.runstate/status.log.1    the previous status log
//! <root>/<run>/.runstate/status.seq      the status message id counter
//! <root>/<run>/.runstate/milestones.json milestones and attributes (see `crate::milestones`)
//! <root>/<run>/.runstate/milestones.lock the lock serializing milestone changes
//! <root>/<run>/<name>.<ext>.lock         a WEPPcloud legacy lock file (read, never written; see `crate::weppcloud`)
//! ```
//!
//! With a state folder (`state_dir`), the bookkeeping folder of a run is
//! `<state_dir>/<run>/` instead of `<root>/<run>/.runstate/`, with the
//! same files in it: the run folder then holds only the documents.
//!
//! The lease files double as the `flock` targets that make check-and-write
//! atomic across processes: a document's writes hold its `doc.<name>.lease`
//! lock (or `records.lock`, below), a save fenced by a run lease holds
//! `run.lease` first.
//!
//! A document's record is created only when something needs it, and only
//! under the run's `records.lock` (let go before the record is locked);
//! runstate never removes one. So a batch write (`put_many`, which
//! migrations use) of a document that has no record writes it holding
//! `records.lock` instead, having found, under that lock, that the record
//! still does not exist: no record can appear, and no other writer can
//! hold one, until it is done. A delete of such a document does the same.
//! A document written only by batches then costs one file, not two
//! (creating files is what a migration into this store spends most of its
//! time on; see `put_group`). Every process
//! writing a store must follow this rule: one older than it (which
//! creates records without that lock) must not write the same store at the
//! same time.
//!
//! Lock order: `run.lease`, then `records.lock`, then document records,
//! except that a batch holding document records may *try* `records.lock`
//! without waiting; whoever holds `records.lock` only tries records, never
//! waits for one, so no two writers wait for each other in a circle.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use runstate_core::process::current_stamp;
use runstate_core::{DocName, Error, ErrorKind, LockKey, RunId, Version};

use crate::BACKEND;
use crate::folder::{Folder, Kind, is_not_a_dir, is_not_found};

/// The hidden bookkeeping folder inside each run folder.
pub(crate) const BOOK_DIR: &str = ".runstate";
/// The file, in the bookkeeping folder, remembering document versions.
pub(crate) const INDEX_FILE: &str = "docs.index";
/// The file, in the bookkeeping folder, whose lock serializes the creation
/// of document records with batch writes of documents that have none (see
/// the module documentation).
pub(crate) const RECORDS_LOCK: &str = "records.lock";
/// Marks temporary files of saves in progress.
const TEMP_MARK: &str = "rstmp";
/// Marks a re-linked previous document during a rollback.
const OLD_MARK: &str = "rsold";

/// The version of a document's bytes: a 128-bit xxh3 hash, in hex.
///
/// Content-addressed versions need no side file that could disagree with
/// the document after a crash, give documents dropped in by other programs
/// a version for free, and never change on a read.
pub(crate) fn version_of(bytes: &[u8]) -> Version {
    Version::new(format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes)))
}

/// Maps an I/O error on `path` during `what` to a runstate error.
pub(crate) fn io_error(what: &str, path: &Path, source: io::Error) -> Error {
    let kind = match source.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => ErrorKind::Denied,
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Backend,
    };
    let retryable = matches!(
        source.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    );
    Error::new(kind, format!("{what} failed on {}", path.display()))
        .with_backend(BACKEND)
        .with_source(source)
        .set_retryable(retryable)
}

/// The file name of a lock's lease record.
pub(crate) fn lease_file_name(key: &LockKey) -> String {
    match key {
        LockKey::Run(_) => "run.lease".to_owned(),
        LockKey::Doc(_, doc) => format!("doc.{doc}.lease"),
    }
}

/// The lock a lease file belongs to, from its name.
pub(crate) fn lock_key_of_file(run: &RunId, name: &str) -> Option<LockKey> {
    if name == "run.lease" {
        return Some(LockKey::Run(run.clone()));
    }
    let doc = name.strip_prefix("doc.")?.strip_suffix(".lease")?;
    Some(LockKey::Doc(run.clone(), DocName::new(doc).ok()?))
}

/// A 16-hex-digit tag of this kernel boot and pid namespace, so a temp
/// file's pid can be judged only where it means the same process.
pub(crate) fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| match current_stamp() {
        Some(stamp) => format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(format!("{}/{}", stamp.boot_id, stamp.pid_ns).as_bytes())
        ),
        None => "0".repeat(16),
    })
}

/// A name for a temporary file beside `<name>.<ext>` that says who wrote
/// it: `.<name>.<ext>.rstmp.<host tag>.<pid>.<start ticks>.<random>`.
pub(crate) fn temp_name(file_name: &str, mark_old: bool) -> String {
    let start = current_stamp().map_or(0, |s| s.start_ticks);
    format!(
        ".{file_name}.{}.{}.{}.{start}.{:016x}",
        if mark_old { OLD_MARK } else { TEMP_MARK },
        host_tag(),
        std::process::id(),
        fastrand::u64(..)
    )
}

/// Who left a temporary file: (host tag, pid, start ticks).
pub(crate) fn parse_temp_name(name: &str) -> Option<(&str, u32, u64)> {
    if !name.starts_with('.') {
        return None;
    }
    let mut parts = name.rsplit('.');
    let _random = parts.next()?;
    let start = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let tag = parts.next()?;
    match parts.next()? {
        TEMP_MARK | OLD_MARK => Some((tag, pid, start)),
        _ => None,
    }
}

/// Resolved locations of one store.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    /// `.<ext>`
    suffix: String,
    /// Where the bookkeeping folders are, when not inside the run folders.
    state: Option<PathBuf>,
}

impl Layout {
    pub(crate) fn new(root: PathBuf, ext: &str, state: Option<PathBuf>) -> Self {
        Layout {
            root,
            suffix: format!(".{ext}"),
            state,
        }
    }

    /// Whether the bookkeeping lives in a state folder of its own, outside
    /// the run folders.
    pub(crate) fn has_state_dir(&self) -> bool {
        self.state.is_some()
    }

    /// Opens the state folder, when there is one and it exists (never
    /// created).
    fn open_state(&self) -> Result<Option<Folder>, Error> {
        let Some(state) = &self.state else {
            return Ok(None);
        };
        match Folder::open_path(state) {
            Ok(folder) => Ok(Some(folder)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(io_error("opening the state folder", state, e)),
        }
    }

    /// The bookkeeping folder of `run` when it exists (never created):
    /// `<state_dir>/<run>/`, or `.runstate` in the run folder `dir` (none
    /// without a run folder).
    pub(crate) fn book(&self, dir: Option<&Folder>, run: &RunId) -> Result<Option<Folder>, Error> {
        if self.state.is_some() {
            return match self.open_state()? {
                Some(state) => state.open_dir(run.as_str()),
                None => Ok(None),
            };
        }
        match dir {
            Some(dir) => dir.open_dir(BOOK_DIR),
            None => Ok(None),
        }
    }

    /// The bookkeeping folder of `run`, created when missing (with the
    /// state folder itself): `<state_dir>/<run>/`, or `.runstate` in the
    /// run folder `dir`, which must then be given.
    pub(crate) fn ensure_book(&self, dir: Option<&Folder>, run: &RunId) -> Result<Folder, Error> {
        if let Some(state) = &self.state {
            let folder = match self.open_state()? {
                Some(folder) => folder,
                None => {
                    fs::create_dir_all(state)
                        .map_err(|e| io_error("creating the state folder", state, e))?;
                    Folder::open_path(state)
                        .map_err(|e| io_error("opening the state folder", state, e))?
                }
            };
            return folder.ensure_dir(run.as_str()).map_err(|e| e.with_run(run));
        }
        match dir {
            Some(dir) => dir.ensure_dir(BOOK_DIR),
            None => Err(Error::new(
                ErrorKind::Backend,
                "no run folder to keep the bookkeeping in",
            )
            .with_backend(BACKEND)
            .with_run(run)),
        }
    }

    /// The runs that have a bookkeeping folder in the state folder (none
    /// without one), sorted; names that are not run ids are skipped.
    pub(crate) fn state_runs(&self) -> Result<Vec<RunId>, Error> {
        let Some(state) = self.open_state()? else {
            return Ok(Vec::new());
        };
        let entries = state
            .entries()
            .map_err(|e| io_error("listing the state folder", state.path(), e))?;
        let mut runs: Vec<RunId> = entries
            .into_iter()
            .filter(|e| e.kind == Kind::Folder)
            .filter_map(|e| RunId::new(e.name).ok())
            .collect();
        runs.sort_unstable();
        Ok(runs)
    }

    /// Opens the store root (following a link: its path is the user's
    /// choice). Opened afresh by every call, so a root that is replaced
    /// while the store is open is the new one.
    pub(crate) fn open_root(&self) -> Result<Folder, Error> {
        Folder::open_path(&self.root).map_err(|e| io_error("opening the store root", &self.root, e))
    }

    /// The document extension, without its dot.
    pub(crate) fn ext(&self) -> &str {
        self.suffix.strip_prefix('.').unwrap_or(&self.suffix)
    }

    /// `<name>.<ext>`
    pub(crate) fn file_name(&self, doc: &DocName) -> String {
        format!("{doc}{}", self.suffix)
    }

    /// The document name of a file in a run folder, if it is a document.
    pub(crate) fn doc_of_file(&self, file: &str) -> Option<DocName> {
        let stem = file.strip_suffix(&self.suffix)?;
        DocName::new(stem).ok()
    }

    /// The run folder, opened: `Ok(None)` when it does not exist; `Denied`
    /// when it is not a folder, or is a symlink leading out of the root. A
    /// symlink is judged by where the folder it opened really is, so it
    /// cannot be swapped between a check and the open.
    pub(crate) fn run_dir(&self, root: &Folder, run: &RunId) -> Result<Option<Folder>, Error> {
        let name = run.as_str();
        match root.try_open_dir(name) {
            Ok(dir) => return Ok(Some(dir)),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) if is_not_a_dir(&e) => {}
            Err(e) => {
                return Err(io_error("opening the run folder", &root.child(name), e).with_run(run));
            }
        }
        // Not a folder: a link (allowed when it stays inside the root) or
        // anything else (refused).
        let kind = root
            .kind_of(name)
            .map_err(|e| io_error("stat of the run folder", &root.child(name), e).with_run(run))?;
        match kind {
            None => return Ok(None),
            Some(Kind::Link) => {}
            Some(_) => return Err(root.refused(name, "folder").with_run(run)),
        }
        let dir = match root.open_dir_following(name) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(root.refused(name, "folder").with_run(run));
            }
            Err(e) => {
                return Err(
                    io_error("opening the run folder link", &root.child(name), e).with_run(run),
                );
            }
        };
        let target = dir.real_path().map_err(|e| {
            io_error("resolving the run folder link", &root.child(name), e).with_run(run)
        })?;
        let real_root = root
            .real_path()
            .map_err(|e| io_error("resolving the store root", root.path(), e))?;
        let denied = |why: String| {
            Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "run folder {} is a symlink to {}, {why}",
                    root.child(name).display(),
                    target.display(),
                ),
            )
            .with_backend(BACKEND)
            .with_run(run))
        };
        let Ok(inside) = target.strip_prefix(&real_root) else {
            return denied(format!("outside the store root {}", real_root.display()));
        };
        // The root itself, or a folder that is no run's (a bookkeeping
        // folder `.runstate`, any hidden one): writing there as a run
        // would overwrite what is kept there.
        if inside.as_os_str().is_empty()
            || inside
                .components()
                .any(|c| c.as_os_str().as_encoded_bytes().first() == Some(&b'.'))
        {
            return denied("which is not a run folder of the store".to_owned());
        }
        // With a state folder, a run's records are `<state_dir>/<run>`, by
        // the name used: a link and its target would keep two sets of
        // records, so two lock records for one file (a lost update).
        if self.state.is_some() {
            return denied(
                "and with state_dir a run folder link would keep records apart from its \
                 target's: use the target's name"
                    .to_owned(),
            );
        }
        Ok(Some(dir))
    }

    /// The run folder opened by its path in one `open` (no handle on the
    /// root first), for the hot read path: `Some` only when `run` names a
    /// real folder (`O_NOFOLLOW`, `O_DIRECTORY`). Everything else — absent,
    /// a link, not a folder, any error — is `None`, and the caller takes
    /// [`run_dir`](Self::run_dir) through the opened root, which gives each
    /// of those cases its own answer. The root's path is resolved afresh, as
    /// [`open_root`](Self::open_root) does.
    pub(crate) fn open_run_dir_direct(&self, run: &RunId) -> Option<Folder> {
        Folder::open_path_nofollow(&self.root.join(run.as_str())).ok()
    }

    /// The run folder, created when missing, and whether this call created
    /// it (with exactly the name `run`). Its entry in the root is made
    /// durable by the first save into it (see `Engine::make_durable`), so
    /// creating it here needs no `fsync`.
    pub(crate) fn ensure_run_dir(
        &self,
        root: &Folder,
        run: &RunId,
    ) -> Result<(Folder, bool), Error> {
        if let Some(dir) = self.run_dir(root, run)? {
            return Ok((dir, false));
        }
        let name = run.as_str();
        let created = root
            .make_dir(name)
            .map_err(|e| io_error("creating the run folder", &root.child(name), e).with_run(run))?;
        let dir = self.run_dir(root, run)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Backend,
                format!(
                    "run folder {} vanished as it was created",
                    root.child(name).display()
                ),
            )
            .with_backend(BACKEND)
            .with_run(run)
        })?;
        Ok((dir, created))
    }
}

/// `fsync` of a directory by path, so entries added, renamed or removed in
/// it are durable. Only for the root's parent, outside the store.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_round_trip() {
        let name = temp_name("prescribed_fire.landuse.nodb", false);
        let (tag, pid, _) = parse_temp_name(&name).unwrap();
        assert_eq!(tag, host_tag());
        assert_eq!(pid, std::process::id());
        assert!(parse_temp_name("ron.nodb").is_none());
        assert!(parse_temp_name(".ron.nodb.other.1.2.3.4").is_none());
        let old = temp_name("ron.json", true);
        assert!(parse_temp_name(&old).is_some());
    }

    #[test]
    fn lease_file_names_round_trip() {
        let run = RunId::new("r").unwrap();
        let doc = DocName::new("a.b").unwrap();
        for key in [LockKey::Run(run.clone()), LockKey::Doc(run.clone(), doc)] {
            let name = lease_file_name(&key);
            assert_eq!(lock_key_of_file(&run, &name), Some(key));
        }
    }

    #[test]
    fn versions_are_content_hashes() {
        assert_eq!(version_of(b"a"), version_of(b"a"));
        assert_ne!(version_of(b"a"), version_of(b"b"));
        assert_eq!(version_of(b"").as_str().len(), 32);
    }
}
