//! Opening what lies under the store root without following links.
//!
//! Every file and folder the backend opens below the root is opened
//! relative to an already-open folder (`openat`), with `O_NOFOLLOW` (and
//! `O_DIRECTORY` for folders), and checked with `fstat` to be what it
//! should be. Files are opened with `O_NONBLOCK`, so a FIFO planted where a
//! document or a lease record belongs is refused instead of blocking the
//! call. A link, a FIFO, a device or a socket is refused with
//! [`ErrorKind::Denied`] naming its path: nothing outside the root is ever
//! read or written through one, and there is no window between a check and
//! an open for someone to swap a link in.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use runstate_core::{Error, ErrorKind, Version};
use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
use rustix::io::Errno;

use crate::BACKEND;
use crate::layout::io_error;

/// What a directory entry is, without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Folder,
    Link,
    /// A FIFO, a device, a socket, or unknown.
    Other,
}

/// One entry of a folder listing.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) kind: Kind,
}

/// How to open a file in a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
    /// Read and write, created (mode 0644 less the umask) when missing.
    Create,
}

/// An open folder, with the path it was opened at (for messages).
#[derive(Debug)]
pub(crate) struct Folder {
    file: File,
    path: PathBuf,
}

/// Identifies a folder across calls: device, inode and, where the file
/// system reports it, birth time (so a folder deleted and recreated with a
/// recycled inode number is another folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FolderId {
    dev: u64,
    ino: u64,
    born: (i64, u32),
}

/// What changes when a file or folder is changed: inode, size, and
/// modification and status-change times in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stamp {
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
    pub(crate) ctime_ns: i128,
}

/// How long after its last change a file's times may still fail to show a
/// further change: the coarsest timestamp granularity of the file systems
/// runstate expects (2 s on FAT; a clock tick elsewhere), with room for the
/// kernel's coarse clock lagging the wall clock.
pub(crate) const RACY_WINDOW_NS: i128 = 2_000_000_000 + 100_000_000;

impl Stamp {
    pub(crate) fn of(meta: &Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// Whether something known about the file as of this stamp (read
    /// starting at `before`, a wall-clock time taken before the stamp) can
    /// be trusted later for as long as the stamp is unchanged. Not when the
    /// file changed so shortly before `before` that a further change could
    /// leave the same times ("racily clean", as git calls it): any change
    /// after `before` sets the status-change time to a later value than a
    /// trusted stamp's.
    pub(crate) fn is_settled(&self, before: i128) -> bool {
        self.ctime_ns.saturating_add(RACY_WINDOW_NS) <= before
            && self.mtime_ns.saturating_add(RACY_WINDOW_NS) <= before
    }
}

/// The wall clock in nanoseconds since the Unix epoch (0 before it).
pub(crate) fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

fn errno(error: &io::Error) -> Option<Errno> {
    Errno::from_io_error(error)
}

impl Folder {
    /// Opens the folder at `path`, following links: for the store root,
    /// whose path the user chose.
    pub(crate) fn open_path(path: &Path) -> io::Result<Folder> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Folder {
            file: File::from(fd),
            path: path.to_owned(),
        })
    }

    /// Opens the folder at `path` without following a link in its last
    /// component (earlier components are followed, as for the root).
    pub(crate) fn open_path_nofollow(path: &Path) -> io::Result<Folder> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Folder {
            file: File::from(fd),
            path: path.to_owned(),
        })
    }

    /// The path it was opened at.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside it, for messages.
    pub(crate) fn child(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn metadata(&self) -> io::Result<Metadata> {
        self.file.metadata()
    }

    /// `fsync` of the folder, so entries added, renamed or removed in it
    /// are durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Which folder this is.
    pub(crate) fn id(&self) -> io::Result<FolderId> {
        let meta = self.metadata()?;
        let born = rustix::fs::statx(&self.file, "", AtFlags::EMPTY_PATH, StatxFlags::BTIME)
            .ok()
            .filter(|s| s.stx_mask & StatxFlags::BTIME.bits() != 0)
            .map_or((0, 0), |s| (s.stx_btime.tv_sec, s.stx_btime.tv_nsec));
        Ok(FolderId {
            dev: meta.dev(),
            ino: meta.ino(),
            born,
        })
    }

    /// Where the open folder really is (not where a link said it was).
    pub(crate) fn real_path(&self) -> io::Result<PathBuf> {
        std::fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .or_else(|_| std::fs::canonicalize(&self.path))
    }

    /// What `name` is, without following a link; `None` when absent.
    pub(crate) fn kind_of(&self, name: &str) -> io::Result<Option<Kind>> {
        match rustix::fs::statat(&self.file, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(kind_of_mode(stat.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The `Denied` error for `name`, which is not a `wanted`.
    pub(crate) fn refused(&self, name: &str, wanted: &str) -> Error {
        let what = match self.kind_of(name) {
            Ok(Some(Kind::Link)) => "a symlink",
            Ok(Some(Kind::Folder)) => "a folder",
            Ok(Some(Kind::File)) => "a regular file",
            Ok(Some(Kind::Other)) => "a FIFO, device or socket",
            Ok(None) | Err(_) => "not what it was a moment ago",
        };
        refused(&self.child(name), what, wanted)
    }

    /// Opens the folder `name` inside this one without following a link;
    /// `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// [`ErrorKind::Denied`] when `name` is a link or not a folder; I/O
    /// errors otherwise.
    pub(crate) fn open_dir(&self, name: &str) -> Result<Option<Folder>, Error> {
        match self.try_open_dir(name) {
            Ok(dir) => Ok(Some(dir)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) if is_not_a_dir(&e) => Err(self.refused(name, "folder")),
            Err(e) => Err(io_error("opening the folder", &self.child(name), e)),
        }
    }

    /// Opens the folder `name` without following a link, reporting every
    /// failure as it is (see [`is_not_a_dir`]).
    pub(crate) fn try_open_dir(&self, name: &str) -> io::Result<Folder> {
        let fd = rustix::fs::openat(
            &self.file,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Folder {
            file: File::from(fd),
            path: self.child(name),
        })
    }

    /// Opens `name`, following a link: only for run folders, whose links
    /// the caller checks by where the open folder really is.
    pub(crate) fn open_dir_following(&self, name: &str) -> io::Result<Folder> {
        let fd = rustix::fs::openat(
            &self.file,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Folder {
            file: File::from(fd),
            path: self.child(name),
        })
    }

    /// Creates the folder `name` (mode 0755 less the umask); `false` when
    /// something by that name already exists.
    pub(crate) fn make_dir(&self, name: &str) -> io::Result<bool> {
        match rustix::fs::mkdirat(&self.file, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The folder `name` inside this one, created when missing; a folder
    /// this call created is made durable in this one (its entry synced)
    /// before it is used, so what is written into it and synced survives
    /// a power loss with it.
    pub(crate) fn ensure_dir(&self, name: &str) -> Result<Folder, Error> {
        if let Some(dir) = self.open_dir(name)? {
            return Ok(dir);
        }
        let created = self
            .make_dir(name)
            .map_err(|e| io_error("creating the folder", &self.child(name), e))?;
        if created {
            self.sync()
                .map_err(|e| io_error("fsync of the folder", self.path(), e))?;
        }
        self.open_dir(name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Backend,
                format!(
                    "{} vanished right after it was created",
                    self.child(name).display()
                ),
            )
            .with_backend(BACKEND)
        })
    }

    /// Opens the regular file `name` without following a link and without
    /// blocking on a FIFO; `Ok(None)` when it does not exist (and `access`
    /// does not create it).
    ///
    /// # Errors
    /// [`ErrorKind::Denied`] when `name` is a link, a folder, a FIFO, a
    /// device or a socket; I/O errors otherwise.
    pub(crate) fn open_file(&self, name: &str, access: Access) -> Result<Option<File>, Error> {
        Ok(self.open_file_meta(name, access)?.map(|(file, _)| file))
    }

    /// [`open_file`](Self::open_file), with the metadata its check read,
    /// so a caller needing the size or times does not `fstat` again.
    pub(crate) fn open_file_meta(
        &self,
        name: &str,
        access: Access,
    ) -> Result<Option<(File, std::fs::Metadata)>, Error> {
        let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let flags = match access {
            Access::Read => OFlags::RDONLY,
            Access::ReadWrite => OFlags::RDWR,
            Access::Create => OFlags::RDWR | OFlags::CREATE,
        };
        let file =
            match rustix::fs::openat(&self.file, name, base | flags, Mode::from_raw_mode(0o644)) {
                Ok(fd) => File::from(fd),
                Err(Errno::NOENT) => return Ok(None),
                // A link (ELOOP), a folder opened for writing (EISDIR), a
                // socket or a FIFO without a reader (ENXIO), a device without
                // its driver (ENODEV).
                Err(Errno::LOOP | Errno::ISDIR | Errno::NXIO | Errno::NODEV | Errno::NOTDIR) => {
                    return Err(self.refused(name, "regular file"));
                }
                Err(e) => return Err(io_error("opening", &self.child(name), e.into())),
            };
        let meta = file
            .metadata()
            .map_err(|e| io_error("stat of", &self.child(name), e))?;
        if !meta.file_type().is_file() {
            let what = if meta.is_dir() {
                "a folder"
            } else {
                "a FIFO, device or socket"
            };
            return Err(refused(&self.child(name), what, "regular file"));
        }
        Ok(Some((file, meta)))
    }

    /// Opens the regular file `name` for appending (`O_APPEND`: every
    /// write lands whole at the end, whoever else appends), created (mode
    /// 0644 less the umask) when missing, without following a link and
    /// without blocking on a FIFO.
    ///
    /// # Errors
    /// [`ErrorKind::Denied`] when `name` is a link, a folder, a FIFO, a
    /// device or a socket; I/O errors otherwise.
    pub(crate) fn open_append(&self, name: &str) -> Result<File, Error> {
        let flags = OFlags::WRONLY
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(&self.file, name, flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => File::from(fd),
            Err(Errno::LOOP | Errno::ISDIR | Errno::NXIO | Errno::NODEV | Errno::NOTDIR) => {
                return Err(self.refused(name, "regular file"));
            }
            Err(e) => return Err(io_error("opening", &self.child(name), e.into())),
        };
        let meta = file
            .metadata()
            .map_err(|e| io_error("stat of", &self.child(name), e))?;
        if !meta.file_type().is_file() {
            return Err(refused(
                &self.child(name),
                "a FIFO, device or socket",
                "regular file",
            ));
        }
        Ok(file)
    }

    /// The inode number of `name`, without following a link; `None` when
    /// absent.
    pub(crate) fn ino_of(&self, name: &str) -> io::Result<Option<u64>> {
        match rustix::fs::statat(&self.file, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat.st_ino)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a new temporary file `name` for writing, with the
    /// permission bits `mode` less the umask from its very creation (a file
    /// created wider and narrowed after could be opened by others in
    /// between, and read later through that descriptor); fails if anything
    /// by that name exists.
    pub(crate) fn create_temp(&self, name: &str, mode: u32) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.file,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode & 0o7777),
        )?;
        Ok(File::from(fd))
    }

    /// Renames `from` over `to`, both in this folder. A link at `to` is
    /// replaced, never followed.
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::renameat(&self.file, from, &self.file, to).map_err(Into::into)
    }

    /// Renames `from` to `to`, both in this folder, unless `to` exists:
    /// `false` (and nothing renamed) then.
    pub(crate) fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<bool> {
        match rustix::fs::renameat_with(
            &self.file,
            from,
            &self.file,
            to,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The modification time of `name`, without following a link; `None`
    /// when absent.
    pub(crate) fn modified_nofollow(&self, name: &str) -> io::Result<Option<SystemTime>> {
        match rustix::fs::statat(&self.file, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => {
                let secs = u64::try_from(stat.st_mtime).unwrap_or(0);
                let nanos = u32::try_from(stat.st_mtime_nsec).unwrap_or(0);
                Ok(Some(
                    SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos.min(999_999_999)),
                ))
            }
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the file (or link) `name`: never what a link points to.
    pub(crate) fn unlink(&self, name: &str) -> io::Result<()> {
        rustix::fs::unlinkat(&self.file, name, AtFlags::empty()).map_err(Into::into)
    }

    /// The entries of the folder, except `.` and `..` and names that are
    /// not UTF-8 (no run id, document or record name is).
    pub(crate) fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut dir = rustix::fs::Dir::read_from(&self.file)?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                rustix::fs::FileType::RegularFile => Kind::File,
                rustix::fs::FileType::Directory => Kind::Folder,
                rustix::fs::FileType::Symlink => Kind::Link,
                rustix::fs::FileType::Unknown => match self.kind_of(name) {
                    Ok(Some(kind)) => kind,
                    // Gone since the folder was read.
                    Ok(None) => continue,
                    Err(e) => return Err(e),
                },
                _ => Kind::Other,
            };
            entries.push(Entry {
                name: name.to_owned(),
                kind,
            });
        }
        Ok(entries)
    }
}

fn kind_of_mode(mode: u32) -> Kind {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::RegularFile => Kind::File,
        rustix::fs::FileType::Directory => Kind::Folder,
        rustix::fs::FileType::Symlink => Kind::Link,
        _ => Kind::Other,
    }
}

fn refused(path: &Path, what: &str, wanted: &str) -> Error {
    Error::new(
        ErrorKind::Denied,
        format!(
            "{} is {what}, not a {wanted}: runstate does not follow links or open special files \
             under the store root",
            path.display()
        ),
    )
    .with_backend(BACKEND)
}

/// Whether opening a folder failed because the entry is a link or not a
/// folder.
pub(crate) fn is_not_a_dir(error: &io::Error) -> bool {
    matches!(errno(error), Some(Errno::LOOP | Errno::NOTDIR))
}

/// Whether an I/O error says the entry was not there.
pub(crate) fn is_not_found(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || errno(error) == Some(Errno::NOENT)
}

/// Reads all of an open file, refusing it with [`ErrorKind::TooLarge`]
/// before reading when `fstat` says it is larger than `limit`, and never
/// reading more than `limit` bytes even if it grows meanwhile.
pub(crate) fn read_bounded(file: &File, path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let size = file
        .metadata()
        .map_err(|e| io_error("stat of", path, e))?
        .len();
    read_bounded_sized(file, path, limit, size)
}

/// [`read_bounded`] of a file whose size `fstat` has just given.
pub(crate) fn read_bounded_sized(
    file: &File,
    path: &Path,
    limit: u64,
    size: u64,
) -> Result<Vec<u8>, Error> {
    if size > limit {
        return Err(too_large(size, limit));
    }
    // Room for what `fstat` said, up to 64 MiB at first: a sparse giant
    // under a limit set very high grows the buffer as it is read (and
    // fails as a read would) instead of aborting on one huge allocation.
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(64 << 20)).unwrap_or(0));
    // The file may grow under a foreign writer; never read past the limit.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("reading", path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

pub(crate) fn too_large(size: u64, limit: u64) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("document is {size} bytes, over the limit of {limit}"),
    )
    .with_backend(BACKEND)
}

/// The version of an open file's content, hashed in chunks from offset 0
/// (so nothing the size of the file is allocated); `None` when it holds
/// more than `limit` bytes, which are then not all read.
pub(crate) fn hash_bounded(file: &File, path: &Path, limit: u64) -> Result<Option<Version>, Error> {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut chunk, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("reading", path, e)),
        };
        if n == 0 {
            break;
        }
        offset += n as u64;
        if offset > limit {
            return Ok(None);
        }
        hasher.update(&chunk[..n]);
    }
    Ok(Some(Version::new(format!("{:032x}", hasher.digest128()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_hashes_equal_whole_hashes() {
        let dir = std::env::temp_dir().join(format!(
            "runstate-hash-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        for len in [0usize, 1, 240, 4096, 256 * 1024, 256 * 1024 + 7, 1_000_003] {
            let mut bytes = vec![0u8; len];
            fastrand::fill(&mut bytes);
            let path = dir.join(format!("f{len}"));
            std::fs::write(&path, &bytes).expect("write");
            let file = File::open(&path).expect("open");
            assert_eq!(
                hash_bounded(&file, &path, u64::MAX).expect("hash"),
                Some(crate::layout::version_of(&bytes)),
                "{len}"
            );
            if len > 0 {
                assert_eq!(
                    hash_bounded(&file, &path, len as u64 - 1).expect("hash"),
                    None
                );
            }
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn settled_stamps() {
        let stamp = Stamp {
            ino: 1,
            size: 1,
            mtime_ns: 10_000_000_000,
            ctime_ns: 10_000_000_000,
        };
        assert!(!stamp.is_settled(10_000_000_000));
        assert!(!stamp.is_settled(11_000_000_000));
        assert!(stamp.is_settled(10_000_000_000 + RACY_WINDOW_NS));
    }
}
