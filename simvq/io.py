"""Generic file I/O shared by every command: atomic writes, local network-weight files, output safety.

This is a leaf module (it imports nothing from simvq), so every layer can use it.

- :func:`atomic_path` / :func:`save_file_atomic`: the one atomic writer. A file is written to a temporary
  file in the same folder, flushed to disk, then moved over the target with ``os.replace``, so a crash leaves
  either the old file or the new one, never half a file.
- :func:`local_weights_file`: network weights come from local files only; nothing is downloaded.
- :func:`check_output`: the one output-safety rule every command applies before it writes: never over a
  file it reads (nor into a folder it reads, where a file would be replaced), never over an existing file
  unless forced; :func:`check_run_folder` / :func:`mark_run_folder`: a training run folder is reused only
  when simvq created it for the same config (``.simvq-run.json``), otherwise it must be new or empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


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


# ----- output safety --------------------------------------------------------------------------------------
RUN_MARKER = ".simvq-run.json"
RUN_MARKER_FORMAT = "simvq-run-v1"
# files that make a folder a simvq model directory (see simvq.checkpoints)
MODEL_FILES = ("config.yaml", "model.safetensors")


def _real(path: str | os.PathLike) -> Path:
    """Absolute path with symlinks and ``..`` resolved (the target need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # hard links, bind mounts, case-insensitive file systems
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    kind: str = "file",
    option: str = "--out",
) -> Path:
    """Check that a command may write ``path``; returns it. Call it before any work is done.

    Args:
        path: the file (``kind="file"``) or folder (``kind="dir"``) the command will write.
        inputs: every file and folder the command reads. An output never replaces an input, nor lies inside an
            input folder (a model directory), even with ``force``.
        force: the user asked to replace an existing output file (``--force``). A folder output with
            ``force`` may hold files already; without it, it must be new or empty.
        kind: ``"file"``, ``"dir"``, or ``"any"`` (only the input rules; the writer checks existence).
        option: the option that named ``path``, for the message.

    Raises ValueError (output is an input), FileExistsError (exists and not forced), NotADirectoryError /
    IsADirectoryError (the wrong kind of thing already there). Symlinks and relative paths are resolved
    before comparing.
    """
    if kind not in ("file", "dir", "any"):
        raise TypeError(f"kind must be 'file', 'dir' or 'any', got {kind!r}")
    given = Path(path)
    target = _real(path)
    for item in inputs:
        if item is None:
            continue
        src = _real(item)
        if _same(target, src):
            raise ValueError(
                f"{option} {given} is also an input of this command ({item}); write to another path (inputs are never replaced, even with --force)"
            )
        if src.is_dir() and _within(target, src):  # a new file there would change the input folder too
            raise ValueError(
                f"{option} {given} lies inside the input folder {item} and would change it; write outside that folder "
                "(inputs are never changed, even with --force)"
            )
        if kind == "dir" and src.is_file() and _within(src, target) and force:
            # a forced folder output may replace the files in it; one of them is an input
            raise ValueError(
                f"{option} {given} holds the input {item}; write to another folder (inputs are never replaced, even with --force)"
            )
    if kind == "file":
        if target.is_dir():
            raise IsADirectoryError(f"{option} {given} is a folder; give a file path")
        if target.exists() and not force:
            raise FileExistsError(f"{option} {given} exists; pass --force to replace it or choose another path")
    elif kind == "dir":
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{option} {given} exists and is not a folder; choose a folder path")
        if target.is_dir() and not force and any(target.iterdir()):
            raise FileExistsError(f"{option} {given} is not empty; pass --force to write into it or choose a new folder")
    return given


OUTPUT_MARKER = ".simvq-output"


def prepare_output_dir(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    resume: bool = False,
    option: str = "--out",
) -> tuple[Path, bool]:
    """Check and create the output folder of ``simvq <command>``; returns ``(folder, held earlier outputs)``.

    The folder must be new or empty, or hold this command's own earlier outputs (a ``.simvq-output`` marker
    names the command that made it), and then only with ``resume`` (reuse them) or ``force`` (replace them). A
    non-empty folder that this command did not make is refused even with ``force``; a folder that is, holds or
    lies inside an input is refused always. Nothing is written before the checks pass.
    """
    out = Path(path).expanduser()
    real = _real(out)
    for item in inputs:
        if item is None:
            continue
        src = _real(item)
        if _within(real, src) or _within(src, real):
            raise ValueError(f"{option} {out} overlaps the input {item}; choose an output folder outside the inputs")
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"{option} {out} is a file; choose a new folder")
    earlier = False
    if real.is_dir() and any(real.iterdir()):
        owner = output_owner(real)
        if owner != command:
            who = f"`simvq {owner}`" if owner else "another program or a person (no .simvq-output marker)"
            raise ValueError(
                f"{option} {out} is not empty and was made by {who}, not `simvq {command}`; choose a new or empty folder "
                "(nothing was written)"
            )
        if not (resume or force):
            raise ValueError(
                f"{option} {out} is not empty: it holds earlier `simvq {command}` outputs; pass --force to replace them "
                "or choose a new folder"
            )
        earlier = True
    out.mkdir(parents=True, exist_ok=True)
    if not (out / OUTPUT_MARKER).is_file():
        save_file_atomic(out / OUTPUT_MARKER, json.dumps({"command": command}) + "\n")
    return out, earlier


def output_owner(folder: str | os.PathLike) -> str | None:
    """The command whose ``.simvq-output`` marker ``folder`` holds (``"export"``, ``"prior train"``...); None
    when there is none or it is unreadable."""
    try:
        return json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def run_marker(directory: str | os.PathLike) -> dict | None:
    """The contents of a run folder's ``.simvq-run.json``; None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(directory) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RUN_MARKER_FORMAT else None


def mark_run_folder(directory: str | os.PathLike, config_hash: str, **info) -> Path:
    """Record (atomically) that simvq created ``directory`` as a training run for the config ``config_hash``."""
    payload = {"format": RUN_MARKER_FORMAT, "config_hash": str(config_hash), **{k: str(v) for k, v in info.items()}}
    return save_file_atomic(Path(directory) / RUN_MARKER, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def check_run_folder(
    directory: str | os.PathLike,
    config_hash: str,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    legacy_hash: Callable[[], str | None] | None = None,
    option: str = "--out",
) -> str:
    """May a training run use ``directory``? Returns ``"new"`` (absent or empty, apart from the inputs) or
    ``"resume"`` (a run folder simvq created for the same config).

    A folder that simvq did not create (no ``.simvq-run.json``; e.g. a model directory or anything else with
    files in it) is refused; so is a run folder of another config. ``legacy_hash`` returns the config hash
    of a run folder written before markers existed (from its checkpoint), or None when it has none.
    """
    given = Path(directory)
    target = _real(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{option} {given} exists and is not a folder; choose a folder for the run")
    for item in inputs:
        if item is not None and _real(item).is_dir() and _within(target, _real(item)):
            raise ValueError(f"{option} {given} lies inside the input folder {item}; put the run elsewhere")
    if not target.is_dir():
        return "new"
    marker = run_marker(target)
    recorded = marker["config_hash"] if marker else (legacy_hash() if legacy_hash is not None else None)
    if recorded is not None:
        if recorded != config_hash:
            raise ValueError(
                f"{option} {given} holds a run with a different model/quantizer config; use a new {option} folder "
                "(nothing was changed)"
            )
        return "resume"
    own_inputs = {_real(i) for i in inputs if i is not None}
    others = [p for p in target.iterdir() if _real(p) not in own_inputs]
    if others:
        what = "a model directory" if all((target / f).exists() for f in MODEL_FILES) else f"{len(others)} file(s) not written by simvq training"
        raise FileExistsError(
            f"{option} {given} holds {what} and is not a simvq run folder; choose a new or empty folder (nothing was changed)"
        )
    return "new"


__all__ = [
    "OUTPUT_MARKER",
    "prepare_output_dir",
    "MODEL_FILES",
    "RUN_MARKER",
    "atomic_path",
    "check_output",
    "check_run_folder",
    "output_owner",
    "local_weights_file",
    "mark_run_folder",
    "run_marker",
    "save_file_atomic",
]
