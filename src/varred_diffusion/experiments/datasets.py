"""Named image data sets (MNIST, Fashion-MNIST) with their train/test splits; never downloads.

``load_dataset("fashion-mnist", "train")`` returns the 60,000 Fashion-MNIST training
images (Xiao, Rasul, Vollgraf, 2017) scaled to ``[-1, 1]`` and their labels, read from
Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or a
directory the user names. ``"mnist"`` (LeCun et al., 1998) resolves as
:mod:`varred_diffusion.experiments.data` does but never falls back to Fashion-MNIST, so a
name always means the data set it says.

Directory resolution per name (first that holds the split wins): the explicit
``data_dir``; the environment variable (``VARRED_MNIST_DIR`` / ``VARRED_FASHION_MNIST_DIR``,
and ``VARRED_DATA_DIR`` for MNIST); then the name's default places.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.data import (
    FASHION_MNIST_DIR,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    candidate_data_dirs,
    find_split_files,
    read_idx,
)

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "dataset_dirs",
    "dataset_missing_reason",
    "load_dataset",
]

DATASET_NAMES = ("mnist", "fashion-mnist")
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Dataset:
    """One split of a named image data set.

    Attributes:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        images: ``[N, 1, 28, 28]`` in ``[-1, 1]`` (``x / 127.5 - 1``).
        labels: ``[N]`` int64 class labels in ``0..9``.
        directory: where the IDX files were read.
        sha256: SHA-256 of the raw ``uint8`` image bytes (all ``N`` before ``limit``),
            a fingerprint for caches built from this split.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    directory: Path
    sha256: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _check_name_split(name: str, split: str) -> None:
    if name not in DATASET_NAMES:
        raise VarRedError(f"name: expected one of {DATASET_NAMES}, got {name!r}")
    if split not in _SPLITS:
        raise VarRedError(f"split: expected 'train' or 'test', got {split!r}")


def dataset_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories :func:`load_dataset` tries for ``name``, in order."""
    _check_name_split(name, "train")
    if data_dir is not None:
        return [Path(data_dir)]
    if name == "fashion-mnist":
        env = os.environ.get("VARRED_FASHION_MNIST_DIR")
        out = [Path(env)] if env else []
        return [*out, FASHION_MNIST_DIR]
    env = os.environ.get("VARRED_MNIST_DIR")
    out = [Path(env)] if env else []
    out += [d for d in candidate_data_dirs(None) if d != FASHION_MNIST_DIR]
    seen: list[Path] = []
    for d in out:
        if d not in seen:
            seen.append(d)
    return seen


def _locate(
    name: str, split: str, data_dir: str | os.PathLike[str] | None
) -> tuple[Path, tuple[Path, Path]] | str:
    """``(directory, (images, labels))`` or, when absent, the reason as a message."""
    tried = dataset_dirs(name, data_dir)
    for d in tried:
        if d.is_dir():
            files = find_split_files(d, split)
            if files is not None:
                return d, files
    places = "\n  ".join(str(t) for t in tried)
    prefix = "train" if split == "train" else "t10k"
    hint = (
        "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "set VARRED_FASHION_MNIST_DIR or pass data_dir/--data-dir"
        if name == "fashion-mnist"
        else "set VARRED_MNIST_DIR (or VARRED_DATA_DIR) or pass data_dir/--data-dir"
    )
    return (
        f"{name} {split!r} split not found: no {prefix}-images-idx3-ubyte[.gz] with its "
        f"labels in any of:\n  {places}\nTo get it: {hint}."
    )


def dataset_missing_reason(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """Why ``load_dataset(name, split, data_dir)`` would fail to find its files, or None.

    Only looks for the files (cheap); use it for ``pytest.skip`` reasons and CLI checks.

    >>> dataset_missing_reason("fashion-mnist", "test") is None  # doctest: +SKIP
    True
    """
    _check_name_split(name, split)
    found = _locate(name, split, data_dir)
    return found if isinstance(found, str) else None


def load_dataset(
    name: str = "mnist",
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load one split of a named data set, images scaled to ``[-1, 1]``.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: a directory of IDX files (raw or ``.gz``) to use instead of the defaults.
        limit: keep the first ``limit`` images (``None``: all).
        dtype: floating dtype of ``images``.

    Returns:
        A :class:`Dataset`: ``images [N, 1, 28, 28]``, ``labels [N]``.

    Raises:
        VarRedError: unknown name or split; the split's files are absent (the message says
            where it looked and how to install them); corrupted IDX files; images and
            labels of different lengths; a negative ``limit``.

    >>> ds = load_dataset("fashion-mnist", "test", limit=8)  # doctest: +SKIP
    >>> ds.images.shape, ds.labels.shape
    (torch.Size([8, 1, 28, 28]), torch.Size([8]))
    """
    _check_name_split(name, split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise VarRedError(f"limit: expected None or an integer >= 0, got {limit!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise VarRedError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    found = _locate(name, split, data_dir)
    if isinstance(found, str):
        raise VarRedError(f"data_dir: {found}")
    directory, (image_file, label_file) = found
    raw = read_idx(image_file, expected_magic=IMAGE_MAGIC)
    labels = read_idx(label_file, expected_magic=LABEL_MAGIC)
    if raw.ndim != 3:
        raise VarRedError(
            f"IDX file {str(image_file)!r}: expected [N, H, W] images, got {list(raw.shape)}"
        )
    if labels.shape[0] != raw.shape[0]:
        raise VarRedError(
            f"IDX files in {str(directory)!r}: {raw.shape[0]} images but {labels.shape[0]} labels"
        )
    digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    if limit is not None:
        raw, labels = raw[:limit], labels[:limit]
    images = (raw.to(dtype) / 127.5 - 1.0).unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
    return Dataset(name, split, images, labels.long(), directory, digest)
