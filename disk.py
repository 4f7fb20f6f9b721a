"""Writing files on a disk that may fill up, for every stage script: checkpoints, shards, manifests, reports, logs.

A file is written under a temporary name, fsync'd, then renamed into place, so a reader sees the old file or the
new one, never half of one. When the disk is full (ENOSPC) the temporary file is removed and the script stops with
one `error:` line that names the folder, the space the file needed and the space left (runtime.UserError), instead
of a traceback and a stray *.tmp; what was written before is untouched.
"""

import errno
import os
import shutil
from pathlib import Path

RESUME = "continue the run with --init_from=resume"  # the trainers' advice after a full disk stopped a write


def free_bytes(folder):
    """Free space, in bytes, of the file system that holds folder (or will: its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n):
    """A byte count as people read it in df -H: 1.6 GB, 40.2 MB, 512 kB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def no_space(folder, name, need, then):
    """The error of a full disk: what needed how much where, the space left, and what to do."""
    from runtime import UserError  # here, not at the top: runtime imports this module (MetricsLog)

    return UserError(
        f"no space left in {folder} for {name}: it needs {size_text(need)}, {size_text(free_bytes(folder))} free; "
        f"free space there (what was written before is intact), then {then}"
    )


def raise_if_full(error, folder, name, need, then):
    """Raise no_space's error in place of an OSError that says the disk (ENOSPC) or the user's quota (EDQUOT) is
    full; return for any other, which the caller raises as it is."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise no_space(folder, name, need, then) from None


def write_atomic(path, data, then="run the same command again"):
    """Write data (bytes, or a list of bytes-like pieces) to path through path.tmp, fsync'd, then rename it into
    place. The .tmp is removed whatever happens; a full disk raises no_space's error with `then` as its advice."""
    path = Path(path)
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    need = sum(memoryview(p).nbytes for p in pieces)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # first: the free space the error reports is without it
        raise_if_full(e, path.parent, path.name, need, then)
        raise
    finally:
        # after the rename it is gone; it is not when rename saw tmp and path as links to one file (POSIX: a no-op)
        tmp.unlink(missing_ok=True)


def copy_file(src, dst, then="run the same command again"):
    """Copy src to dst as write_atomic writes (small files: a tokenizer)."""
    write_atomic(dst, Path(src).read_bytes(), then)


def link_or_copy(src, dst, then="run the same command again"):
    """Make dst the same file as src: a hard link (no space taken) where the file system has them, else a copy.
    Either way dst is replaced in one rename, and src's data lives on through dst when src is deleted later."""
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # EPERM, EXDEV, ENOTSUP, EMLINK: no hard links here (FAT, some FUSE and network file systems)
        copy_file(src, dst, then)
        return
    try:
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # as in write_atomic: left when dst already was src


def append(path, data, then="run the same command again"):
    """Append data (bytes) to path whole or not at all: on a full disk the file is cut back to its old length, so
    a reader never meets half a record (a resumed run appends after whole ones)."""
    path = Path(path)
    with open(path, "ab", buffering=0) as f:
        end = os.fstat(f.fileno()).st_size
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take part of the bytes and say so
                view = view[f.write(view) :]
        except OSError as e:
            os.ftruncate(f.fileno(), end)
            raise_if_full(e, path.parent, path.name, len(data), then)
            raise
