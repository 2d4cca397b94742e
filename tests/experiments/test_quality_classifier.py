"""Named data sets, the feature classifier and its checksummed cache, the Fréchet evaluator."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.classifier import (
    ClassifierSettings,
    FeatureClassifier,
    classifier_accuracy,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from varred_diffusion.experiments.datasets import dataset_missing_reason, load_dataset
from varred_diffusion.experiments.quality import FrechetEvaluator

TINY = ClassifierSettings(width=4, feature_dim=8, epochs=1, batch=64, seed=3)


def _idx(magic: int, arr: np.ndarray) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _fake_split(d, prefix: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx(2051, rng.integers(0, 256, (n, 28, 28))))
    )
    (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx(2049, rng.integers(0, 10, (n,))))
    )


def test_load_dataset_from_a_user_directory(tmp_path, seed):
    _fake_split(tmp_path, "train", 6, seed)
    ds = load_dataset("fashion-mnist", "train", tmp_path, limit=4)
    assert ds.images.shape == (4, 1, 28, 28) and ds.labels.shape == (4,)
    assert ds.labels.dtype == torch.int64 and float(ds.images.abs().max()) <= 1.0
    assert (
        len(ds.sha256) == 64
        and ds.sha256 == load_dataset("fashion-mnist", "train", tmp_path).sha256
    )
    assert dataset_missing_reason("fashion-mnist", "train", tmp_path) is None
    reason = dataset_missing_reason("fashion-mnist", "test", tmp_path)
    assert reason is not None and "t10k-images" in reason and str(tmp_path) in reason
    with pytest.raises(VarRedError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path)
    with pytest.raises(VarRedError, match="name"):
        load_dataset("cifar10", "train")
    with pytest.raises(VarRedError, match="split"):
        load_dataset("mnist", "val")


def test_fashion_mnist_full_split(fashion_mnist_splits):
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (1, 28, 28)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))


def test_classifier_cache_round_trip_and_checksum(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(300, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (300,), generator=g)
    m1, acc = load_or_train_classifier(
        x, y, "abc", TINY, cache_dir=tmp_path, test_images=x, test_labels=y
    )
    files = list(tmp_path.glob("classifier-*.ckpt"))
    assert len(files) == 1 and 0.0 <= acc <= 1.0
    m2, acc2 = load_or_train_classifier(
        x[:1], y[:1], "abc", TINY, cache_dir=tmp_path
    )  # loaded, not trained
    assert acc2 == acc
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(m1.features(x[:5]), m2.features(x[:5]))
    with pytest.raises(VarRedError, match="configuration"):
        load_classifier(files[0], TINY, "other-data")
    raw = bytearray(files[0].read_bytes())
    raw[-10] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with pytest.raises(VarRedError, match="sha256"):
        load_or_train_classifier(x, y, "abc", TINY, cache_dir=tmp_path)
    # A fresh save goes through an atomic write and leaves no temporary file behind.
    save_classifier(files[0], m1, TINY, "abc", accuracy=acc)
    assert load_classifier(files[0], TINY, "abc")[1] == acc
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_training_is_deterministic(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(128, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (128,), generator=g)
    a, b = train_classifier(x, y, TINY), train_classifier(x, y, TINY)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.features(x[:3]).shape == (3, 8) and bool((a.features(x[:3]) >= 0).all())
    with pytest.raises(VarRedError, match="x"):
        a.features(torch.zeros(2, 1, 14, 14))


def test_classifier_learns_fashion_mnist(fashion_mnist_splits, tmp_path):
    train = load_dataset("fashion-mnist", "train", limit=2000)
    test = load_dataset("fashion-mnist", "test", limit=1000)
    model = train_classifier(train.images, train.labels, ClassifierSettings(epochs=1, seed=0))
    acc = classifier_accuracy(model, test.images, test.labels)
    assert acc > 0.6  # chance is 0.1; the default 5 epochs on 60,000 images reach 0.91
    ev = FrechetEvaluator.from_images(model, test.images[:400])
    assert ev.evaluate(test.images[:400]) == pytest.approx(0.0, abs=1e-6)
    shuffled = ev.evaluate(test.images[400:800])
    noise = ev.evaluate(
        torch.rand(400, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    assert 0 < shuffled < noise  # other real images are much closer than uniform noise


def test_evaluator_sampling_shapes(seed):
    model = FeatureClassifier(4, 8, generator=torch.Generator().manual_seed(seed))
    ev = FrechetEvaluator.from_images(model, torch.rand(20, 1, 28, 28) * 2 - 1, batch_size=7)
    x = ev.sample(lambda x, s: -x / (0.25 + s[:, None, None, None] ** 2), torch.Generator().manual_seed(1),
                  steps=3, batch_size=8)  # fmt: skip
    assert x.shape == (20, 1, 28, 28) and ev.count == 20
    assert ev.evaluate(x) >= 0.0
