//! The durable, atomic replacement of a document:
//! temp file in the same folder → write → `fsync` → rename over the target
//! → `fsync` of the folder.
//!
//! Any failure removes the temporary file and leaves the previous document
//! in place. A failed `fsync` is reported, never retried: after a failed
//! `fsync` the kernel may have dropped the dirty pages, so a second call
//! could succeed without the data being on disk. If the folder `fsync`
//! fails after the rename, the previous document is put back (copied from
//! a descriptor opened before the rename), so a failed save never leaves
//! its bytes visible.
//!
//! A batch (`Engine::put_many`) stages each of its documents (starting
//! each file's writeback as it is written, see `writeback`), syncs each,
//! renames them all, then syncs the folder once ([`sync_placed`]); a
//! failure of that one `fsync` puts every renamed document back.
//!
//! A replaced document keeps the permission bits of the file it replaces;
//! a new one gets 0644 less the umask.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use runstate_core::{Error, ErrorKind};

use crate::BACKEND;
use crate::folder::Folder;
use crate::layout::{io_error, temp_name};

#[cfg(feature = "fault-injection")]
pub(crate) use crate::config::SaveStep;

/// The steps a fault hook can fail; without the feature, nothing can.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum SaveStep {
    Create,
    Write,
    Fsync,
    Rename,
    DirFsync,
    RootFsync,
}

/// The optional fault hook of a store.
#[derive(Clone, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    pub(crate) hook: Option<crate::config::FaultHook>,
}

impl Faults {
    #[inline]
    pub(crate) fn check(&self, step: SaveStep, path: &std::path::Path) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if let Some(hook) = &self.hook {
            return hook(step, path);
        }
        let _ = (step, path);
        Ok(())
    }
}

/// The permission bits of an open file.
pub(crate) fn permission_bits(file: &File) -> io::Result<u32> {
    Ok(file.metadata()?.permissions().mode() & 0o777)
}

/// A temporary file holding the new bytes, durably written; removed on drop
/// unless it was renamed into place.
///
/// Only [`Staged::write`] and [`Unsynced::sync`] make one, so a file that
/// was not synced cannot be renamed over a document.
pub(crate) struct Staged<'a> {
    dir: &'a Folder,
    name: String,
    file: File,
    /// The permission bits it was given, when they were set explicitly.
    mode: Option<u32>,
    placed: bool,
}

impl<'a> Staged<'a> {
    /// Writes `bytes` to a fresh temporary file beside `file_name` in `dir`,
    /// with permission bits `mode` when given (those of the document it is
    /// expected to replace), and `fsync`s it.
    pub(crate) fn write(
        dir: &'a Folder,
        file_name: &str,
        bytes: &[u8],
        mode: Option<u32>,
        faults: &Faults,
    ) -> Result<Staged<'a>, Error> {
        let staged = Self::create(dir, file_name, bytes, mode, faults)?;
        staged.sync(faults)?;
        Ok(staged)
    }

    /// [`write`](Self::write) without the `fsync`, for a batch that stages
    /// all of its documents first: it starts the file's writeback instead
    /// (see [`writeback`](crate::writeback)); [`Unsynced::sync`] then makes
    /// it a [`Staged`] file that can be renamed into place.
    pub(crate) fn write_unsynced(
        dir: &'a Folder,
        file_name: &str,
        bytes: &[u8],
        mode: Option<u32>,
        faults: &Faults,
    ) -> Result<Unsynced<'a>, Error> {
        let staged = Self::create(dir, file_name, bytes, mode, faults)?;
        crate::writeback::start(&staged.file);
        Ok(Unsynced(staged))
    }

    /// The `fsync` of [`write`](Self::write).
    fn sync(&self, faults: &Faults) -> Result<(), Error> {
        let path = self.path();
        faults
            .check(SaveStep::Fsync, &path)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_error("fsync of the temporary file", &path, e))
    }

    /// The temporary file with `bytes` written, not synced: only
    /// [`write`](Self::write) and [`Unsynced::sync`] let it out.
    fn create(
        dir: &'a Folder,
        file_name: &str,
        bytes: &[u8],
        mode: Option<u32>,
        faults: &Faults,
    ) -> Result<Staged<'a>, Error> {
        let name = temp_name(file_name, false);
        let path = dir.child(&name);
        // Created with the document's own permission bits (0644 for a new
        // one), never wider: a document kept 0600 is not readable by
        // others through its next version's temporary file.
        let file = dir
            .create_temp(&name, mode.unwrap_or(0o644))
            .map_err(|e| io_error("creating the temporary file", &path, e))?;
        let mut staged = Staged {
            dir,
            name,
            file,
            mode: None,
            placed: false,
        };
        faults
            .check(SaveStep::Create, &path)
            .map_err(|e| io_error("creating the temporary file", &path, e))?;
        // Exactly `mode`, which the umask may have narrowed at creation.
        if let Some(mode) = mode {
            staged.set_mode(mode)?;
        }
        faults
            .check(SaveStep::Write, &path)
            .and_then(|()| staged.file.write_all(bytes))
            .map_err(|e| io_error("writing the temporary file", &path, e))?;
        Ok(staged)
    }

    /// The temporary file, open for writing.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Its path, for messages.
    pub(crate) fn path(&self) -> std::path::PathBuf {
        self.dir.child(&self.name)
    }

    fn set_mode(&mut self, mode: u32) -> Result<(), Error> {
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| {
                io_error(
                    "setting the permissions of the temporary file",
                    &self.dir.child(&self.name),
                    e,
                )
            })?;
        self.mode = Some(mode);
        Ok(())
    }

    /// Renames the staged file over `target` (in its folder) and makes the
    /// rename durable. `previous` is the open current document, if any:
    /// its permission bits are kept, and it is restored when the folder
    /// `fsync` fails.
    pub(crate) fn place(
        self,
        target: &str,
        previous: Option<&File>,
        conditional: bool,
        faults: &Faults,
    ) -> Result<(), Error> {
        let dir = self.dir;
        self.rename_over(target, previous, conditional, faults)?;
        sync_placed(dir, &[(target, previous)], faults)
            .map_err(|e| io_error("fsync of the run folder", dir.path(), e))
    }

    /// The first half of [`place`](Self::place): the rename, without the
    /// folder `fsync`, for a batch that syncs its folder once for all its
    /// renames ([`sync_placed`]). Until then the caller keeps `previous`
    /// open and holds the document's record.
    ///
    /// `conditional`: the write's condition was checked on `previous` (or
    /// on no document), so right before the rename the entry must still be
    /// that file (or absent), else the write is refused (`Precondition`,
    /// nothing written). runstate's own writers cannot change it meanwhile
    /// (they hold the record), but another program can: a WEPPcloud worker
    /// renaming its dump in while this save hashed the old file or synced
    /// a time. An overwrite does not care what it replaces.
    pub(crate) fn rename_over(
        mut self,
        target: &str,
        previous: Option<&File>,
        conditional: bool,
        faults: &Faults,
    ) -> Result<(), Error> {
        let dir = self.dir;
        let target_path = dir.child(target);
        if let Some(previous) = previous {
            let mode = permission_bits(previous)
                .map_err(|e| io_error("stat of the document", &target_path, e))?;
            if self.mode != Some(mode) {
                // The document changed its mode since the save began: give
                // the new bytes that mode, durably, before they replace it.
                self.set_mode(mode)?;
                self.file.sync_all().map_err(|e| {
                    io_error("fsync of the temporary file", &dir.child(&self.name), e)
                })?;
            }
        }
        let renaming = |e| {
            io_error(
                "renaming the temporary file over the document",
                &target_path,
                e,
            )
        };
        faults
            .check(SaveStep::Rename, &target_path)
            .map_err(renaming)?;
        if conditional {
            let now = dir
                .ino_of(target)
                .map_err(|e| io_error("stat of the document", &target_path, e))?;
            let checked = previous
                .map(|file| file.metadata().map(|meta| meta.ino()))
                .transpose()
                .map_err(|e| io_error("stat of the document", &target_path, e))?;
            if now != checked {
                return Err(Error::new(
                    ErrorKind::Precondition,
                    "the document was replaced by another program during the save; nothing \
                     was written",
                )
                .with_backend(BACKEND));
            }
        }
        dir.rename(&self.name, target).map_err(renaming)?;
        self.placed = true;
        Ok(())
    }
}

/// Makes the renames over `placed` (each a target in `dir` with the
/// document it replaced, open since before the rename) durable with one
/// `fsync` of the folder. When that fails, every one of them is put back
/// (see [`put_back`]) before the error is returned, so a failed save never
/// leaves its bytes visible.
pub(crate) fn sync_placed(
    dir: &Folder,
    placed: &[(&str, Option<&File>)],
    faults: &Faults,
) -> io::Result<()> {
    let synced = faults
        .check(SaveStep::DirFsync, dir.path())
        .and_then(|()| dir.sync());
    if synced.is_err() {
        for (target, previous) in placed {
            put_back(dir, target, *previous);
        }
        // Best effort, once for all: the folder just failed to sync.
        let _ = dir.sync();
    }
    synced
}

/// A temporary file written by [`Staged::write_unsynced`], not yet synced;
/// removed on drop.
pub(crate) struct Unsynced<'a>(Staged<'a>);

impl<'a> Unsynced<'a> {
    /// `fsync`s the file: a [`Staged`] one, which can be renamed into place.
    /// On failure it is removed.
    pub(crate) fn sync(self, faults: &Faults) -> Result<Staged<'a>, Error> {
        self.0.sync(faults)?;
        Ok(self.0)
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.placed
            && let Err(error) = self.dir.unlink(&self.name)
        {
            tracing::warn!(
                path = %self.dir.child(&self.name).display(),
                %error,
                "could not remove a temporary file"
            );
        }
    }
}

/// Puts the previous document back after a failed folder `fsync`: its
/// bytes are still readable through the descriptor opened before the rename
/// (the inode lives while it is open), so they are copied, in chunks, to a
/// new temporary file that is renamed over the target. Without a previous
/// document the target is removed. A failure is logged: nothing more can
/// be done for that document.
fn put_back(dir: &Folder, target: &str, previous: Option<&File>) {
    let outcome = match previous {
        None => dir.unlink(target),
        Some(file) => rewrite_previous(dir, target, file),
    };
    if let Err(error) = outcome {
        tracing::error!(
            path = %dir.child(target).display(),
            %error,
            "could not restore the previous document after a failed save"
        );
    }
}

fn rewrite_previous(dir: &Folder, target: &str, previous: &File) -> io::Result<()> {
    let name = temp_name(target, true);
    let written = (|| {
        let bits = permission_bits(previous)?;
        let mut file = dir.create_temp(&name, bits)?;
        file.set_permissions(std::fs::Permissions::from_mode(bits))?;
        let mut chunk = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        loop {
            let n = match previous.read_at(&mut chunk, offset) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            file.write_all(&chunk[..n])?;
            offset += n as u64;
        }
        file.sync_all()?;
        dir.rename(&name, target)
    })();
    if written.is_err() {
        let _ = dir.unlink(&name);
    }
    written
}
