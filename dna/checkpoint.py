"""Atomic file writes and integrity-checked checkpoints.

A checkpoint file is ``MAGIC + sha256(payload) + payload`` where the payload is
a ``torch.save`` archive. Loading verifies the header and checksum before the
payload reaches the (weights-only) unpickler.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dna.errors import DetectedFault

if TYPE_CHECKING:
    import pandas as pd

MAGIC = b"DNACKPT1"
_DIGEST_SIZE = hashlib.sha256().digest_size
HEADER_SIZE = len(MAGIC) + _DIGEST_SIZE


class CheckpointError(RuntimeError, DetectedFault):
    """A checkpoint file is missing, damaged, or not a checkpoint."""


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Not mkstemp: its 0600 mode would carry over to the final file; this honours the umask.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder next to ``path``; on clean exit it replaces ``path`` (a folder, or a link to one).

    If the block raises, the new folder is removed and ``path`` is untouched. Nothing under the old ``path`` is
    written to (its files may be links, into DVC's cache say): it is moved aside whole, then removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would carry over to the final folder; this honours the umask
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _replace_dir(new: Path, path: Path) -> None:
    aside = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
    try:
        os.rename(path, aside)  # a link is renamed, not followed
    except FileNotFoundError:
        aside = None
    try:
        os.rename(new, path)
    except OSError:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rename(aside, path)  # the old one back, unless another took its place meanwhile
        raise
    if aside is None:
        return
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def save_checkpoint(path: str | Path, state: dict) -> str:
    """Write ``state`` atomically with a checksummed header; return the hex sha256."""
    buf = io.BytesIO()
    torch.save(state, buf)  # fully in memory: a failure here never touches ``path``
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).digest()
    atomic_write_bytes(path, MAGIC + digest + payload)
    return digest.hex()


def _read_header(f, path: Path) -> bytes:
    """Check magic and header length; return the stored digest."""
    header = f.read(HEADER_SIZE)
    if not header:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    magic = header[: len(MAGIC)]
    if magic != MAGIC[: len(magic)]:
        raise CheckpointError(f"{path}: not a checkpoint (bad magic {magic!r})")
    if len(header) < HEADER_SIZE:
        raise CheckpointError(
            f"{path}: truncated checkpoint ({len(header)} bytes, header needs {HEADER_SIZE})"
        )
    return header[len(MAGIC):]


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open checkpoint ({e})") from e


def checkpoint_digest(path: str | Path) -> str:
    """The sha256 recorded in the header (the payload is neither read nor verified)."""
    path = Path(path)
    with _open(path) as f:
        return _read_header(f, path).hex()


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's sha256 (for files that are not checkpoints: splits, exports)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def digest(*parts) -> str:
    """The first 16 hex digits of the sha256 of JSON-able parts (pydantic models as their JSON dump, as a fingerprint
    sees them: without settings that change no result, such as data.num_workers)."""
    text = json.dumps([p.model_dump(mode="json", context={"fingerprint": True}) if hasattr(p, "model_dump") else p
                       for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    with _open(path) as f:
        expected = _read_header(f, path)
        payload = f.read()
    if not payload:
        raise CheckpointError(f"{path}: truncated checkpoint (header only, no payload)")
    actual = hashlib.sha256(payload).digest()
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch (stored {expected.hex()[:16]}..., "
            f"computed {actual.hex()[:16]}...): file is corrupt or truncated"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: payload is not a weights-only checkpoint ({type(e).__name__}: {first_line})"
        ) from e
