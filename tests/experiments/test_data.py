"""IDX reading and data-directory resolution (varred_diffusion.experiments.data)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.experiments import data as vdata

MNIST = Path("/work/shared/data/mnist")


def _idx(magic: int, arr: np.ndarray) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_split(d: Path, prefix: str, n: int, rng: np.random.Generator, gz: bool) -> np.ndarray:
    imgs = rng.integers(0, 256, size=(n, 28, 28))
    labels = rng.integers(0, 10, size=(n,))
    for name, blob in ((f"{prefix}-images-idx3-ubyte", _idx(2051, imgs)),
                       (f"{prefix}-labels-idx1-ubyte", _idx(2049, labels))):  # fmt: skip
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (d / name).write_bytes(blob)
    return imgs


@pytest.mark.parametrize("gz", [False, True])
def test_small_idx_roundtrip(tmp_path, seed, gz):
    rng = np.random.default_rng(seed)
    imgs = _write_split(tmp_path, "t10k", 5, rng, gz)
    x = vdata.load_images(tmp_path, split="test")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, (torch.from_numpy(imgs).float() / 127.5 - 1).unsqueeze(1))
    assert vdata.load_labels(tmp_path, split="auto").shape == (5,)
    assert vdata.load_images(tmp_path, split="auto", limit=2).shape[0] == 2  # auto -> test
    with pytest.raises(VarRedError, match="'train'"):
        vdata.load_images(tmp_path, split="train")


def test_auto_prefers_train(tmp_path, seed):
    rng = np.random.default_rng(seed)
    _write_split(tmp_path, "t10k", 3, rng, False)
    _write_split(tmp_path, "train", 4, rng, True)
    assert vdata.load_images(tmp_path).shape[0] == 4


@pytest.mark.parametrize("damage", ["magic", "truncated", "extra", "gzip", "short"])
def test_corrupted_idx(tmp_path, damage):
    arr = np.zeros((2, 28, 28))
    blob = _idx(2051, arr)
    if damage == "magic":
        blob = _idx(2052, arr)
    elif damage == "truncated":
        blob = blob[:-5]
    elif damage == "extra":
        blob = blob + b"\x00"
    elif damage == "gzip":
        blob = gzip.compress(blob)[:-8]
    else:
        blob = b"\x00\x00"
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(blob)
    with pytest.raises(VarRedError, match="t10k-images-idx3-ubyte"):
        vdata.read_idx(path, expected_magic=2051)


def test_labels_magic_checked(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(_idx(2051, np.zeros((1, 2, 2))))
    with pytest.raises(VarRedError, match="expected 2049"):
        vdata.read_idx(path, expected_magic=2049)


def test_data_dir_resolution(tmp_path, monkeypatch, seed):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VarRedError, match="empty"):
        vdata.find_data_dir(empty)
    good = tmp_path / "good"
    good.mkdir()
    _write_split(good, "t10k", 2, np.random.default_rng(seed), False)
    monkeypatch.setenv("VARRED_DATA_DIR", str(good))
    assert vdata.find_data_dir() == good
    monkeypatch.setenv("VARRED_DATA_DIR", str(empty))
    tried = vdata.candidate_data_dirs()
    assert tried[0] == empty and vdata.FASHION_MNIST_DIR in tried
    monkeypatch.setattr(vdata, "candidate_data_dirs", lambda d=None: [empty, tmp_path / "none"])
    with pytest.raises(VarRedError, match="tried") as info:
        vdata.find_data_dir()
    assert "none" in str(info.value)


@pytest.mark.skipif(not MNIST.is_dir(), reason="real MNIST test split not present")
def test_real_mnist_test_split():
    sums = dict(
        line.split()[::-1] for line in (MNIST / "SHA256SUMS").read_text().splitlines() if line
    )
    for name, digest in sums.items():
        assert hashlib.sha256((MNIST / name.lstrip("*")).read_bytes()).hexdigest() == digest
    x = vdata.load_images(MNIST, split="test")
    y = vdata.load_labels(MNIST, split="test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y, minlength=10) > 800, torch.ones(10, dtype=torch.bool))
