"""Atomic output files and tamper-evident checkpoints for the reproduction experiments.

Every file an experiment writes goes through :func:`atomic_write_bytes`: the bytes are
written to a temporary file in the destination directory, flushed, ``fsync``-ed and moved
into place with ``os.replace``. A run killed at any instant leaves either the previous
complete file or the new complete file, never a half-written one (the temporary file, a
hidden ``.name.*.tmp``, may remain and is ignored by readers).

Checkpoints are ``torch.save`` payloads wrapped in a small header that carries a format
tag, the payload size and its SHA-256. :func:`load_checkpoint` verifies all three before
calling ``torch.load(..., weights_only=True)`` (no arbitrary code execution), and raises
:class:`varred.errors.VarRedError` naming the path on any mismatch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from varred.errors import VarRedError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_generator_states",
    "load_checkpoint",
    "plus_minus",
    "save_checkpoint",
    "save_figure",
    "set_generator_states",
    "to_jsonable",
    "write_csv",
    "write_json",
    "write_markdown",
]

CHECKPOINT_FORMAT = "varred-checkpoint-v1"
_MAGIC = b"VARRED-CKPT\n"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Args:
        path: destination; parent directories are created.
        data: the complete file contents.

    Returns:
        The destination as a ``Path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; best effort elsewhere)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy scalars, paths and tuples into JSON-friendly values.

    Non-finite floats become ``None`` (strict JSON has no NaN/Inf).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    fieldnames: Iterable[str] | None = None,
) -> Path:
    """Atomically write ``rows`` (dicts) as CSV; columns in first-seen order unless given."""
    if fieldnames is None:
        names: list[str] = []
        for row in rows:
            names.extend(k for k in row if k not in names)
    else:
        names = list(fieldnames)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in names})
    return atomic_write_text(path, buf.getvalue())


def _csv_value(v: Any) -> Any:
    v = to_jsonable(v)
    if isinstance(v, float):
        return f"{v:.10g}"
    return "" if v is None else v


def plus_minus(value: float | None, stderr: float | None, spec: str = ".3g") -> str:
    """``"0.331 ± 0.021"`` for a Markdown table (just the value when the SE is NaN/None;
    ``"–"`` when the value itself is: nothing measured, e.g. a target never reached)."""
    if value is None or not math.isfinite(value):
        return "–"
    if stderr is None or not math.isfinite(stderr):
        return format(value, spec)
    return f"{format(value, spec)} ± {stderr:.2g}"


def write_markdown(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write a markdown document."""
    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def save_figure(path: str | os.PathLike[str], fig: Any, *, dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG in memory, write it atomically, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint: header (format tag, size, sha256) + ``torch.save`` payload.

    Args:
        path: destination file.
        state: tensors, numbers, strings, lists and dicts only (what
            ``torch.load(weights_only=True)`` accepts).

    Returns:
        The destination as a ``Path``.
    """
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    header = {
        "format": CHECKPOINT_FORMAT,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode("ascii") + b"\n"
    return atomic_write_bytes(path, _MAGIC + head + payload)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        VarRedError: the file is missing, is not a varred checkpoint, has another format
            tag, is truncated, fails its checksum, or cannot be unpickled safely.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise VarRedError(f"checkpoint {str(p)!r}: cannot be read ({exc})") from exc
    if not raw.startswith(_MAGIC):
        raise VarRedError(
            f"checkpoint {str(p)!r}: expected a varred checkpoint (starting with {_MAGIC!r}), "
            f"got {raw[: len(_MAGIC)]!r}"
        )
    rest = raw[len(_MAGIC) :]
    newline = rest.find(b"\n")
    try:
        header = json.loads(rest[:newline].decode("ascii")) if newline >= 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise VarRedError(f"checkpoint {str(p)!r}: header is corrupted (expected one JSON line)")
    if header.get("format") != CHECKPOINT_FORMAT:
        raise VarRedError(
            f"checkpoint {str(p)!r}: format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    payload = rest[newline + 1 :]
    if len(payload) != header.get("size"):
        raise VarRedError(
            f"checkpoint {str(p)!r}: payload has {len(payload)} bytes, header says "
            f"{header.get('size')} (truncated or appended to)"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.get("sha256"):
        raise VarRedError(
            f"checkpoint {str(p)!r}: sha256 {digest} does not match the header's "
            f"{header.get('sha256')} (the file was modified)"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of every kind
        raise VarRedError(
            f"checkpoint {str(p)!r}: payload cannot be loaded safely ({exc})"
        ) from exc
    if not isinstance(state, dict):
        raise VarRedError(
            f"checkpoint {str(p)!r}: expected a dict payload, got {type(state).__name__}"
        )
    return state


def get_generator_states(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Snapshot the states of named ``torch.Generator`` objects (``uint8`` tensors)."""
    return {name: g.get_state().clone() for name, g in generators.items()}


def set_generator_states(
    generators: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor]
) -> None:
    """Restore states captured by :func:`get_generator_states`.

    Raises:
        VarRedError: a generator has no saved state.
    """
    for name, g in generators.items():
        if name not in states:
            raise VarRedError(
                f"states: expected a saved state for generator {name!r}, got keys {sorted(states)}"
            )
        g.set_state(states[name].clone())
