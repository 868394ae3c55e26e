"""Files that are never half-written: atomic writes, JSON without NaN, safetensors with a JSON manifest.

Every write goes to a temporary name in the destination's directory, is flushed and fsynced, and is renamed over the
final name, so a crash (or ``kill -9``) at any point leaves either the old file or the new one, never a torn file.
Temporary names start with ``.`` and end with ``.tmp`` (`is_temporary`), so leftovers of a crash are recognisable and
cleaned up at the next start (`remove_leftovers`).

A leaf module: it imports nothing else from adaptune but the errors.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.errors import ArtifactError

if TYPE_CHECKING:
    import torch

METADATA_KEY = "adaptune"
TMP_SUFFIX = ".tmp"
_MAX_NAME_IN_TMP = 64  # a temporary name must stay legal when the final name is near the 255-byte limit


def _step(name: str) -> None:
    """A named point inside a multi-step write (``write``, ``fsync``, ``rename``, ``swap-*``); does nothing.

    Tests replace it to crash the write at each point and prove that nothing under a final name is ever torn.
    """


def tmp_prefix(path: Path) -> str:
    return f".{path.name[:_MAX_NAME_IN_TMP]}."


def is_temporary(path: Path) -> bool:
    """A leftover of an interrupted write (`atomic_write_bytes`, checkpoint swaps)."""
    return path.name.startswith(".") and (path.name.endswith(TMP_SUFFIX) or ".tmp" in path.suffixes)


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temporary files and directories an interrupted write left in ``directory``; return them."""
    import shutil

    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if is_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def unwritable(path: Path, error: OSError) -> ArtifactError:
    """The one-line error for a destination that cannot be written."""
    why = error.strerror or type(error).__name__
    return ArtifactError(
        f"{path}: cannot write ({why}); check the permissions and free space of {str(path.parent)!r}, or choose "
        "another location"
    )


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename.

    Raises:
        ArtifactError: The directory does not exist or cannot be written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ArtifactError(f"{path}: directory {str(path.parent)!r} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp creates 0600; final files get the usual permissions
        with os.fdopen(fd, "wb") as f:
            _step("write")
            f.write(data)
            f.flush()
            _step("fsync")
            os.fsync(f.fileno())
        _step("rename")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise unwritable(path, e) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
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


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so it serialises as valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (never ``NaN``/``Infinity``): non-finite numbers become null."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, manifest: dict[str, Any] | None = None
) -> None:
    """Save tensors atomically; ``manifest`` goes into the metadata as JSON under the key ``adaptune``."""
    from safetensors.torch import save

    metadata = {METADATA_KEY: to_json(manifest)} if manifest is not None else None
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw string metadata of a safetensors file (no code runs while reading one).

    Raises:
        ArtifactError: Missing, truncated or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not a safetensors file") from None
    try:
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); the file is truncated or "
            "corrupt: re-create it (adaptune merge / train)"
        ) from None
    metadata = header.get("__metadata__") or {}
    return tensors, metadata if isinstance(metadata, dict) else {}


class DirectoryLock:
    """An OS file lock on ``directory/.adaptune.lock``, held while one process writes into the directory.

    The lock is ``fcntl.flock`` on an open file: the OS releases it when the process ends in any way (``kill -9``
    included), so a stale lock file never blocks a later run. The file records the holder's pid for the message.

    Raises:
        ArtifactError: Another process holds the lock.
    """

    NAME = ".adaptune.lock"

    def __init__(self, directory: Path, what: str = "training"):
        self.path = Path(directory) / self.NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        except OSError as e:
            raise unwritable(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ArtifactError(
                f"{self.path.parent}: another adaptune process (pid {holder}) is {self.what} into this directory; "
                "wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
