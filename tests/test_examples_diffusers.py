"""examples/train_diffusers.py: three steps of diffusers' loop with varred, for ε/v/sample.

With β = 0 during GradientControl's warm-up (10 steps) the controlled gradient is the plain
one, so the varred run and diffusers' own loop (``--no-varred``, same seed: same init, data,
noise and timesteps) must report the same losses: the first step's to 1e-6 relative (ε; v and
sample: the float32 bound of tests/diffusion/test_diffusers_loop.py), the next two after
identical updates up to round-off.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers not installed")
pytest.importorskip("accelerate", reason="accelerate not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_diffusers.py"
TINY = [
    "--synthetic", "32", "--resolution", "8", "--block_out_channels", "8", "16",
    "--norm_num_groups", "4", "--train_batch_size", "8", "--max_train_steps", "3", "--cpu",
]  # fmt: skip


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_diffusers", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("prediction_type", "tol"), [("epsilon", 1e-6), ("v_prediction", 5e-5), ("sample", 5e-5)]
)
def test_three_steps_match_diffusers_loop(prediction_type: str, tol: float) -> None:
    mod = _example()
    state = torch.random.get_rng_state()
    args = [*TINY, "--prediction_type", prediction_type]
    ours = mod.main(args)
    plain = mod.main([*args, "--no-varred"])
    assert torch.equal(torch.random.get_rng_state(), state)  # randomness only via generators
    assert len(ours["losses"]) == 3 and all(math.isfinite(v) for v in ours["losses"])
    assert ours["diagnostics"]["loss"].shape == ()
    rel = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], plain["losses"])]
    assert rel[0] < tol, rel
    assert max(rel) < 1e-4, rel
    p_ours = torch.cat([p.detach().flatten() for p in ours["model"].parameters()])
    p_plain = torch.cat([p.detach().flatten() for p in plain["model"].parameters()])
    assert float((p_ours - p_plain).abs().max()) < 1e-5  # same updates while β = 0
