"""Writing the trainer's files: atomically (temporary file + ``os.replace``) and with the mode an
ordinary ``open()`` would give them under the user's umask (``tempfile.mkstemp`` makes them 0600)."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Callable, Optional

__all__ = ["file_mode", "atomic_write"]


def file_mode() -> int:
    """0o666 less the process umask: the mode ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True,
                 before_replace: Optional[Callable[[], None]] = None) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, give it the umask's
    mode, run ``before_replace()`` if given, then move it to ``path`` in one ``os.replace``: a reader
    sees the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
