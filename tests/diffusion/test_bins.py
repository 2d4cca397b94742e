"""Log-σ bins: edges, centres, index consistent with the edges, clamping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred_diffusion.bins import SigmaBins


def test_edges_and_centers() -> None:
    b = SigmaBins(0.01, 100.0, 4)
    assert torch.allclose(
        b.edges, torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64), rtol=1e-14
    )
    assert torch.allclose(
        b.centers,
        torch.tensor([10**-1.5, 10**-0.5, 10**0.5, 10**1.5], dtype=torch.float64),
        rtol=1e-14,
    )
    assert b.edges[0] == 0.01 and b.edges[-1] == 100.0


@given(
    log_sigma=st.lists(st.floats(min_value=-12.0, max_value=8.0), min_size=1, max_size=20),
    k=st.integers(min_value=1, max_value=50),
)
def test_index_matches_edges(log_sigma: list[float], k: int) -> None:
    b = SigmaBins(1e-4, 80.0, k)
    sigma = torch.exp(torch.tensor(log_sigma, dtype=torch.float64))
    idx = b.index(sigma)
    assert idx.dtype == torch.long and idx.shape == sigma.shape
    assert bool(((idx >= 0) & (idx < k)).all())
    le = b.log_edges
    ls = torch.log(sigma)
    inside = (ls >= le[0]) & (ls < le[-1])
    # σ inside the range lies in its bin (up to one ulp at an edge)
    lo, hi = le[idx], le[idx + 1]
    tol = 1e-12
    assert bool(((ls >= lo - tol) & (ls <= hi + tol) | ~inside).all())
    assert bool((idx[ls < le[0]] == 0).all()) and bool((idx[ls >= le[-1]] == k - 1).all())


def test_counts_and_float32() -> None:
    b = SigmaBins(0.01, 100.0, 4)
    s = torch.tensor([0.02, 0.03, 0.5, 50.0], dtype=torch.float32)
    assert b.counts(s).tolist() == [2, 1, 0, 1]
    assert b.index(b.centers.float()).tolist() == [0, 1, 2, 3]


def test_errors() -> None:
    with pytest.raises(VarRedError, match="sigma_min"):
        SigmaBins(1.0, 1.0, 3)
    with pytest.raises(VarRedError, match="num_bins"):
        SigmaBins(0.1, 1.0, 0)
    with pytest.raises(VarRedError, match="sigma"):
        SigmaBins(0.1, 1.0, 2).index(torch.tensor([1, 2]))
    assert math.isclose(float(SigmaBins(0.1, 1.0, 1).centers[0]), math.sqrt(0.1))
