//! Starting a file's writeback before its `fsync`.
//!
//! A batch (`Engine::put_many`) stages each document in a temporary file
//! and then `fsync`s every one of them before any rename. An `fsync` first
//! writes the file's dirty pages out and only then waits for them, so one
//! `fsync` after another writes one file at a time. Asking the kernel to
//! start each file's writeback as soon as it is written
//! (`sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`, which does not
//! wait) puts the whole group's data on its way to the disk together; the
//! `fsync`s that follow then mostly wait for writes already under way, and
//! the file system commits the group's metadata in fewer journal commits.
//! Measured on this project's machine with a small C harness (ext4 on a
//! virtual disk; groups of 8 files of 16 KiB, each `fsync`ed, renamed, one
//! folder `fsync` per group; 22 paired runs of 800 files): 0.96–1.85× the
//! files per second of the same batches without it, median 1.30×; the
//! three runs below 1.05× ran while a build loaded the same disk. Starting
//! the `fsync`s in parallel threads instead gained nothing (0.71–1.28×).
//!
//! It is a hint and never replaces the `fsync`: durability still comes
//! only from each file's `fsync`, which also reports any write error (the
//! call does not consume it: it only starts writeback, it does not wait).
//! So a failure of the hint is ignored, and outside Linux it does nothing.

use std::fs::File;

/// Starts writing `file`'s dirty pages to its disk, without waiting; a
/// failure is only logged (see the module documentation).
pub(crate) fn start(file: &File) {
    if let Err(error) = try_start(file) {
        // Not an error of the save: the `fsync` that follows decides.
        tracing::trace!(%error, "could not start the writeback of a staged file");
    }
}

/// `sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)` on `file`.
#[cfg(target_os = "linux")]
fn try_start(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;

    // std and rustix wrap no `sync_file_range`, and libc's binding is an
    // `extern` function, hence `unsafe`.
    #[expect(unsafe_code, reason = "one system call without a safe wrapper")]
    // SAFETY: the call takes four integers and no pointer, so it cannot
    // read or write this process's memory; the descriptor is `file`'s,
    // which the shared borrow keeps open (and so not reused for another
    // file) for the whole call.
    let started =
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if started == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Nothing to start outside Linux: the `fsync` that follows writes the file
/// out.
#[cfg(not(target_os = "linux"))]
fn try_start(_file: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::path::PathBuf;

    use super::{start, try_start};

    /// A folder removed when the test ends, passed or not.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writeback_starts_on_a_file_and_fails_quietly_elsewhere() {
        let dir = Scratch(
            std::env::temp_dir().join(format!("runstate-writeback-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.0.join("staged"))
            .unwrap();
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        // The call is made, and succeeds, on a regular file.
        try_start(&file).expect("writeback started");
        file.sync_all().unwrap();
        file.rewind().unwrap();
        let mut read = Vec::new();
        file.read_to_end(&mut read).unwrap();
        assert_eq!(read, bytes);
        // A character device refuses it (ESPIPE); `start` only logs that.
        let null = std::fs::File::open("/dev/null").unwrap();
        let refused = try_start(&null).expect_err("no writeback on a device");
        assert_eq!(refused.raw_os_error(), Some(libc::ESPIPE), "{refused}");
        start(&null);
    }
}
