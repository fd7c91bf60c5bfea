"""A case-insensitive, case-preserving passthrough file system, for tests.

Usage: python casefold_fs.py [--read-only] BACKING_FOLDER MOUNT_POINT

Mounts BACKING_FOLDER at MOUNT_POINT (in the foreground, single-threaded;
read-only with --read-only, as a share mounted `ro` would be)
the way vfat, CIFS or a casefolded ext4 folder behave: a name finds an
entry whatever the case of its letters (ASCII), and entries keep the case
they were created with. Inode numbers are the backing files' own
(`use_ino`), so two spellings of one name report the same inode, and the
kernel caches no name lookups (all timeouts 0), so a lookup always sees
the current folder.

It stops, unmounting, on SIGTERM, SIGINT or SIGHUP, and by itself when its
parent process goes away. Needs the `mfusepy` package and libfuse 3, and
root (it mounts without `fusermount3`).

Used by crates/backend-file/tests/case_insensitive.rs.
"""

import errno
import os
import signal
import sys
import threading
import time

import mfusepy as fuse


class CaseFold(fuse.Operations):
    use_ns = True

    def __init__(self, backing):
        self.backing = os.path.realpath(backing)

    def init_with_config(self, conn, config):
        if config is not None:
            config.use_ino = 1
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.attr_timeout = 0.0

    # A path of the mounted file system -> the backing path: each component
    # is the existing entry whose name equals it ignoring ASCII case, or
    # itself when there is none (a name about to be created).
    def real(self, path):
        current = self.backing
        for part in [p for p in path.split("/") if p]:
            exact = os.path.join(current, part)
            if os.path.lexists(exact):
                current = exact
                continue
            wanted = part.lower()
            try:
                names = os.listdir(current)
            except OSError:
                names = []
            match = next((n for n in names if n.lower() == wanted), None)
            current = os.path.join(current, match if match is not None else part)
        return current

    def getattr(self, path, fh=None):
        st = os.fstat(fh) if fh is not None else os.lstat(self.real(path))
        keys = (
            "st_mode",
            "st_ino",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_size",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        )
        attrs = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = attrs.pop(k + "_ns")
        return attrs

    def readdir(self, path, fh):
        # With `use_ino`, an entry listed without its inode number would be
        # listed as inode 0, which readdir(3) skips.
        folder = self.real(path)
        entries = []
        for name in [".", ".."] + os.listdir(folder):
            st = os.lstat(os.path.join(folder, name))
            entries.append((name, {"st_ino": st.st_ino, "st_mode": st.st_mode}, 0))
        return entries

    def readlink(self, path):
        return os.readlink(self.real(path))

    def access(self, path, amode):
        if not os.access(self.real(path), amode, follow_symlinks=False):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self.real(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self.real(path))
        return 0

    def unlink(self, path):
        os.unlink(self.real(path))
        return 0

    def symlink(self, target, source):
        os.symlink(source, self.real(target))
        return 0

    def rename(self, old, new):
        os.rename(self.real(old), self.real(new))
        return 0

    def chmod(self, path, mode):
        os.chmod(self.real(path), mode, follow_symlinks=False)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self.real(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path, times=None):
        if times is None:
            os.utime(self.real(path), follow_symlinks=False)
        else:
            os.utime(self.real(path), ns=times, follow_symlinks=False)
        return 0

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self.real(path), length)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self.real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(sv, k) for k in keys}

    def open(self, path, flags):
        return os.open(self.real(path), flags | os.O_NOFOLLOW)

    def create(self, path, mode, flags):
        return os.open(self.real(path), flags | os.O_CREAT | os.O_NOFOLLOW, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def watch_parent():
    """Stops the file system (libfuse unmounts on SIGTERM) once the process
    that started it is gone, so a killed test leaves no mount behind."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)


def main():
    args = sys.argv[1:]
    read_only = "--read-only" in args
    args = [a for a in args if a != "--read-only"]
    if len(args) != 2:
        sys.exit("usage: casefold_fs.py [--read-only] BACKING_FOLDER MOUNT_POINT")
    backing, mount_point = args
    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        fuse.FUSE(
            CaseFold(backing),
            mount_point,
            foreground=True,
            nothreads=True,
            fsname="runstate-casefold",
            default_permissions=True,
            ro=read_only,
        )
    except RuntimeError:
        # libfuse reports a loop ended by a signal as an error; the file
        # system was unmounted all the same.
        pass


if __name__ == "__main__":
    main()
