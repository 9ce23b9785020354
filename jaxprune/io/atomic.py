"""Committing a finished directory to its final name, so the name holds a complete result or nothing.

A writer fills a hidden temporary sibling and calls `commit_directory(staged, path, overwrite)`:

- a new `path` is one `rename` (atomic; if another process created `path` meanwhile, the rename
  fails and this one gets a CheckpointError: exactly one writer wins);
- an existing `path` (only with `overwrite`) is swapped with the staged directory in one
  ``renameat2(RENAME_EXCHANGE)`` call (Linux), so `path` holds the old or the new directory at
  every instant, never nothing; the old one, now under the staged name, is then removed. Where
  the exchange is unavailable the old directory is first renamed to a hidden name beside it.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for name in ("new", "old"):
    ...     os.makedirs(os.path.join(d, name))
    ...     open(os.path.join(d, name, name), "w").close()
    >>> commit_directory(os.path.join(d, "new"), os.path.join(d, "out"))
    >>> commit_directory(os.path.join(d, "old"), os.path.join(d, "out"))
    Traceback (most recent call last):
    ...
    jaxprune.errors.CheckpointError: ...out already exists; pass overwrite=True to replace it
    >>> commit_directory(os.path.join(d, "old"), os.path.join(d, "out"), overwrite=True)
    >>> sorted(os.listdir(d)), os.listdir(os.path.join(d, "out"))
    (['out'], ['old'])
"""

from __future__ import annotations

import os
import shutil

from jaxprune.errors import CheckpointError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_libc = None


def exchange(a: str, b: str) -> bool:
    """Atomically swap the paths `a` and `b` (both must exist); False where the OS cannot."""
    global _libc
    try:
        import ctypes
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):   # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), b)


def commit_directory(staged: str, path: str, overwrite: bool = False) -> None:
    """Move the finished directory `staged` to `path` (see the module docstring)."""
    if not os.path.lexists(path):
        try:
            os.rename(staged, path)
            return
        except OSError:
            if not os.path.lexists(path):
                raise
    if not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    if os.path.isdir(path) and not os.path.islink(path) and exchange(staged, path):
        shutil.rmtree(staged, ignore_errors=True)   # the old directory, now under the staged name
        return
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{os.getpid()}")
    os.rename(path, old)
    os.rename(staged, path)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["commit_directory", "exchange"]
