"""Generic file I/O shared by every command: atomic writes, local network-weight files, output safety.

This is a leaf module (it imports nothing from simvq), so every layer can use it.

- :func:`atomic_path` / :func:`save_file_atomic`: the one atomic writer. A file is written to a temporary
  file in the same folder, flushed to disk, then moved over the target with ``os.replace``, so a crash leaves
  either the old file or the new one, never half a file.
- :func:`local_weights_file`: network weights come from local files only; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Use for writers that want a file name (``torch.save``, ``safetensors.save_file``)::

        with atomic_path("out/last.ckpt") as tmp:
            torch.save(obj, tmp)

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # the data must be on disk before the rename makes it visible
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_file_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``data`` is bytes, text (UTF-8), or a callable that writes the file at the temporary path it is given.
    """
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif callable(data):
            data(tmp)
        else:
            raise TypeError(f"data must be bytes, str or a callable(path), got {type(data).__name__}")
    return Path(path)


def local_weights_file(weights: str | os.PathLike | None, env_var: str, what: str) -> Path | None:
    """A network-weights file from the argument, else from ``env_var``; None when neither is set.

    Nothing is downloaded. A path that is given but missing is an error naming where it came from, so a
    typo cannot silently switch a metric or loss to its offline stand-in.
    """
    source = "argument"
    if weights is None:
        weights = os.environ.get(env_var) or None
        source = f"environment variable {env_var}"
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path} (from the {source})")
    return path



__all__ = ["atomic_path", "local_weights_file", "save_file_atomic"]
