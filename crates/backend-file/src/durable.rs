//! The durable, atomic replacement of a document:
//! temp file in the same folder → write → `fsync` → rename over the target
//! → `fsync` of the folder.
//!
//! Any failure removes the temporary file and leaves the previous document
//! in place. A failed `fsync` is reported, never retried: after a failed
//! `fsync` the kernel may have dropped the dirty pages, so a second call
//! could succeed without the data being on disk. If the folder `fsync`
//! fails after the rename, the previous document is put back (rewritten
//! from a descriptor opened before the rename), so a failed save never
//! leaves its bytes visible.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use runstate_core::Error;

use crate::layout::{io_error, sync_dir, temp_name};

#[cfg(feature = "fault-injection")]
pub(crate) use crate::config::SaveStep;

/// The steps a fault hook can fail; without the feature, nothing can.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum SaveStep {
    Write,
    Fsync,
    Rename,
    DirFsync,
}

/// The optional fault hook of a store.
#[derive(Clone, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    pub(crate) hook: Option<crate::config::FaultHook>,
}

impl Faults {
    #[inline]
    fn check(&self, step: SaveStep, path: &Path) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if let Some(hook) = &self.hook {
            return hook(step, path);
        }
        let _ = (step, path);
        Ok(())
    }
}

/// A temporary file holding the new bytes, durably written; removed on drop
/// unless it was renamed into place.
pub(crate) struct Staged {
    path: PathBuf,
    placed: bool,
}

impl Staged {
    /// Writes `bytes` to a fresh temporary file beside `file_name` in `dir`
    /// and `fsync`s it.
    pub(crate) fn write(
        dir: &Path,
        file_name: &str,
        bytes: &[u8],
        faults: &Faults,
    ) -> Result<Staged, Error> {
        let path = dir.join(temp_name(file_name, false));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| io_error("creating the temporary file", &path, e))?;
        let staged = Staged {
            path,
            placed: false,
        };
        faults
            .check(SaveStep::Write, &staged.path)
            .and_then(|()| file.write_all(bytes))
            .map_err(|e| io_error("writing the temporary file", &staged.path, e))?;
        faults
            .check(SaveStep::Fsync, &staged.path)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("fsync of the temporary file", &staged.path, e))?;
        Ok(staged)
    }

    /// Renames the staged file over `target` (in `dir`) and makes the rename
    /// durable. `previous` is the open current document, if any, used to
    /// restore it when the folder `fsync` fails.
    pub(crate) fn place(
        mut self,
        dir: &Path,
        target: &Path,
        previous: Option<&File>,
        faults: &Faults,
    ) -> Result<(), Error> {
        faults
            .check(SaveStep::Rename, target)
            .and_then(|()| fs::rename(&self.path, target))
            .map_err(|e| io_error("renaming the temporary file over the document", target, e))?;
        self.placed = true;
        if let Err(e) = faults
            .check(SaveStep::DirFsync, dir)
            .and_then(|()| sync_dir(dir))
        {
            let error = io_error("fsync of the run folder", dir, e);
            restore(dir, target, previous);
            return Err(error);
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed
            && let Err(error) = fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), %error, "could not remove a temporary file");
        }
    }
}

/// Puts the previous document back after a failed folder `fsync`: its
/// bytes are still readable through the descriptor opened before the rename
/// (the inode lives while it is open), so they are written to a new
/// temporary file that is renamed over the target. Without a previous
/// document the target is removed.
fn restore(dir: &Path, target: &Path, previous: Option<&File>) {
    let outcome = match previous {
        None => fs::remove_file(target),
        Some(file) => rewrite_previous(dir, target, file),
    };
    match outcome {
        Ok(()) => {
            // Best effort: the folder just failed to sync once.
            let _ = sync_dir(dir);
        }
        Err(error) => tracing::error!(
            path = %target.display(),
            %error,
            "could not restore the previous document after a failed save"
        ),
    }
}

fn rewrite_previous(dir: &Path, target: &Path, previous: &File) -> io::Result<()> {
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = previous.read_at(&mut chunk, offset)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        offset += n as u64;
    }
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(temp_name(&file_name, true));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&path, target)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&path);
    }
    written
}
