"""MNIST-format (IDX) image loading for the experiments; never downloads anything.

The IDX format (LeCun et al., MNIST distribution): a 4-byte big-endian magic number
(``0x0000`` + dtype code ``0x08`` = unsigned byte + number of dimensions), one 4-byte
big-endian size per dimension, then the row-major data. Images have magic 2051
(``0x00000803``, ``[N, H, W]``), labels 2049 (``0x00000801``, ``[N]``). Files may be raw
or gzip-compressed (detected from the content, not the name).

Data directory resolution (first that exists wins): the explicit ``data_dir`` argument
(``--data-dir``), the environment variable ``VARRED_DATA_DIR``, ``../shared/data/mnist``
relative to the current directory, the same relative to each ancestor of this file (the
repository root), and Debian's Fashion-MNIST at ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from varred.errors import VarRedError

__all__ = [
    "FASHION_MNIST_DIR",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "candidate_data_dirs",
    "find_data_dir",
    "find_split_files",
    "load_images",
    "load_labels",
    "read_idx",
]

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> torch.Tensor:
    """Read one IDX file (raw or gzip) of unsigned bytes.

    Args:
        path: the file.
        expected_magic: require this magic number (2051 images, 2049 labels); ``None``
            accepts either.

    Returns:
        ``uint8`` tensor ``[N, H, W]`` (images) or ``[N]`` (labels).

    Raises:
        VarRedError: unreadable file, bad gzip stream, wrong magic, or a data size that does
            not match the header (message names the path).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise VarRedError(f"IDX file {str(p)!r}: cannot be read ({exc})") from exc
    if len(raw) < 4:
        raise VarRedError(
            f"IDX file {str(p)!r}: expected at least a 4-byte header, got {len(raw)} bytes"
        )
    magic = int.from_bytes(raw[:4], "big")
    allowed = (expected_magic,) if expected_magic is not None else (IMAGE_MAGIC, LABEL_MAGIC)
    if magic not in allowed:
        raise VarRedError(
            f"IDX file {str(p)!r}: magic number {magic}, expected {' or '.join(map(str, allowed))}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise VarRedError(
            f"IDX file {str(p)!r}: header truncated ({len(raw)} bytes, need {header})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise VarRedError(
            f"IDX file {str(p)!r}: {len(raw) - header} data bytes, expected {expected} "
            f"for shape {dims}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def candidate_data_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories :func:`find_data_dir` tries, in order."""
    out: list[Path] = []
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("VARRED_DATA_DIR")
    if env:
        out.append(Path(env))
    rel = Path("..") / "shared" / "data" / "mnist"
    out.append((Path.cwd() / rel).resolve())
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists():
            out.append((parent / rel).resolve())
    out.append(FASHION_MNIST_DIR)
    seen: list[Path] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def find_split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` files of ``split`` ("train" or "test") in ``directory``, or None."""
    prefix = _PREFIX[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        hit = None
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                cand = directory / f"{prefix}-{kind.replace('-', sep, 1)}{suffix}"
                if cand.is_file():
                    hit = cand
                    break
            if hit:
                break
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """First candidate directory holding at least one IDX split.

    Raises:
        VarRedError: none holds IDX files; the message lists every place tried.
    """
    tried = candidate_data_dirs(data_dir)
    for d in tried:
        if d.is_dir() and any(find_split_files(d, s) for s in _PREFIX):
            return d
    places = "\n  ".join(str(t) for t in tried)
    raise VarRedError(
        "data_dir: no MNIST-format IDX files (train-images-idx3-ubyte[.gz] or "
        f"t10k-images-idx3-ubyte[.gz]) found; tried:\n  {places}\n"
        "Pass --data-dir, set VARRED_DATA_DIR, or install Debian's dataset-fashion-mnist."
    )


def _resolve_split(directory: Path, split: str) -> tuple[str, tuple[Path, Path]]:
    if split not in ("train", "test", "auto"):
        raise VarRedError(f"split: expected 'train', 'test' or 'auto', got {split!r}")
    order = ["train", "test"] if split == "auto" else [split]
    for s in order:
        files = find_split_files(directory, s)
        if files is not None:
            return s, files
    raise VarRedError(f"split: no {split!r} IDX files in {str(directory)!r}")


def load_images(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "auto",
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images of an IDX split scaled to ``[-1, 1]`` (``x / 127.5 - 1``).

    Args:
        data_dir: directory of IDX files; ``None`` resolves as in the module docstring.
        split: "train", "test", or "auto" (train when present, else test).
        limit: keep only the first ``limit`` images.
        dtype: floating dtype of the result.

    Returns:
        ``[N, 1, H, W]`` tensor in ``[-1, 1]`` (28×28 for MNIST).

    >>> x = load_images(split="test", limit=16)  # doctest: +SKIP
    >>> x.shape
    torch.Size([16, 1, 28, 28])
    """
    directory = find_data_dir(data_dir)
    _, (images, labels) = _resolve_split(directory, split)
    x = read_idx(images, expected_magic=IMAGE_MAGIC)
    if x.ndim != 3:
        raise VarRedError(
            f"IDX file {str(images)!r}: expected [N, H, W] images, got {list(x.shape)}"
        )
    y = read_idx(labels, expected_magic=LABEL_MAGIC)
    if y.shape[0] != x.shape[0]:
        raise VarRedError(
            f"IDX files in {str(directory)!r}: {x.shape[0]} images but {y.shape[0]} labels"
        )
    if limit is not None:
        x = x[:limit]
    return (x.to(dtype) / 127.5 - 1.0).unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]


def load_labels(
    data_dir: str | os.PathLike[str] | None = None, *, split: str = "auto"
) -> torch.Tensor:
    """Labels ``[N]`` (int64) of the same split :func:`load_images` would read."""
    directory = find_data_dir(data_dir)
    _, (_, labels) = _resolve_split(directory, split)
    return read_idx(labels, expected_magic=LABEL_MAGIC).long()
