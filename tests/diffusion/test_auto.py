"""AutoStep keeps a control only where it pays, and otherwise is the plain step."""

from __future__ import annotations

import pytest
import torch

import varred_diffusion as vd
from varred import VarRedError
from varred_diffusion.auto import choose_bins

F64 = torch.float64


def test_choose_bins_model() -> None:
    # nothing removed: nothing kept
    assert choose_bins([0.0, 0.0], [0.5, 0.5], 2.0, 0.1) == ([], 1.0)
    # 99% removed in one bin holding half the batch, at 2x cost for all bins:
    # controlling bin 0 alone: V = 0.01 + ..., t = 1 + 0.5 -> efficiency 1/(0.5 * 1.5)
    bins, eff = choose_bins([0.5, 0.0], [0.5, 0.5], 2.0, 0.1)
    assert bins == [0] and eff == pytest.approx(1 / (0.5 * 1.5))
    # the same reduction at 10x the cost does not pay
    assert choose_bins([0.5, 0.0], [0.5, 0.5], 10.0, 0.1)[0] == []
    # two paying bins are both kept
    assert choose_bins([0.45, 0.45], [0.5, 0.5], 2.0, 0.1)[0] == [0, 1]


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x, sigma)


def _train(auto: vd.AutoStep, model: torch.nn.Module, steps: int, g: torch.Generator) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = vd.ring8()
    for _ in range(steps):
        auto(data.sample(32, g).to(F64), generator=g)
        opt.step()


def test_auto_keeps_c0_at_small_sigma_where_it_pays(generator: torch.Generator) -> None:
    model = vd.MLPScore(2, width=16, depth=2, generator=generator).to(F64)
    bins = vd.SigmaBins(1e-3, 0.05, 4)
    auto = vd.AutoStep(model, model.parameters(), bins=bins, probe_steps=16, recheck_every=64)
    _train(auto, model, 20, generator)
    (decision,) = auto.decisions
    assert decision["active_bins"] == [0, 1, 2, 3], decision
    assert decision["efficiency"] > 1.1
    assert decision["variance_ratio_all_bins"] < 0.5
    assert auto.active and not auto.probing


def test_auto_is_the_plain_step_where_no_control_pays(generator: torch.Generator) -> None:
    """A control that costs 1000x a plain step never pays: after the probe every step is the
    plain one (one score evaluation, no coefficient work)."""
    net = vd.MLPScore(2, width=16, depth=2, generator=generator).to(F64)
    model = Counting(net)
    cost = [0.0]
    bins = vd.SigmaBins(1e-3, 0.05, 4)
    auto = vd.AutoStep(
        model, net.parameters(), bins=bins, probe_steps=16, recheck_every=64,
        clock=lambda: cost[0],
    )  # fmt: skip
    for part, seconds in ((auto.plain, 1.0), (auto.controlled, 1000.0)):  # an exact fake clock

        def timed(*a, _run=part.step, _s=seconds, **k):
            cost[0] += _s
            return _run(*a, **k)

        part.step = timed
    _train(auto, net, 16, generator)
    (decision,) = auto.decisions
    assert decision["active_bins"] == []
    calls = model.calls
    _train(auto, net, 5, generator)
    assert model.calls - calls == 5  # exactly the plain step's one forward per step


def test_auto_rechecks_and_refuses_objective_changes(generator: torch.Generator) -> None:
    model = vd.MLPScore(2, width=8, depth=1, generator=generator).to(F64)
    bins = vd.SigmaBins(1e-3, 0.05, 2)
    auto = vd.AutoStep(model, model.parameters(), bins=bins, probe_steps=4, recheck_every=8)
    _train(auto, model, 20, generator)
    assert [d["step"] for d in auto.decisions] == [4, 12, 20]

    class Shifted(vd.LogUniformSigma):
        changes_objective = True

    with pytest.raises(VarRedError, match="never changes the objective"):
        vd.AutoStep(model, model.parameters(), bins=bins, samplers=[Shifted(1e-3, 0.05)])
    with pytest.raises(VarRedError, match="probe_steps"):
        vd.AutoStep(model, model.parameters(), bins=bins, probe_steps=2)
