"""Cost of one recipe training step (``Recipe.build``) relative to plain DSM (same run).

``SmallUNet`` on MNIST-sized inputs ``[B, 1, 28, 28]``; orders k = 0, 1, 2 × coefficient
granularity scalar / per-tensor / per-element / per-element-per-σ-bin (running β).
Times are medians over repeats after a warm-up step, plain and controlled interleaved
in the same process. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above
the model + batch; on CPU each configuration runs in a fresh subprocess and reports its
peak-RSS increase over the state after building model + batch (Linux: ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``; elsewhere ``resource.getrusage``).

Usage::

    python benchmarks/train_step.py --device cuda --batch 128
    python benchmarks/train_step.py --quick            # CPU: batch 32, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from varred.layout import CoefficientLayout
from varred_diffusion import Recipe, SigmaBins, TaylorControl, dsm_loss
from varred_diffusion.models import SmallUNet

TARGETS = {"time_k0_element": 2.2, "time_k1": 3.5, "memory_k0": 2.5}


@dataclass(frozen=True)
class Config:
    """One benchmarked step: ``order=None`` is the plain DSM step."""

    order: int | None
    granularity: str = "element"
    binned: bool = False
    stack: bool = False
    split: bool = False  # binned only: one forward per σ bin (group_forward="split")

    @property
    def name(self) -> str:
        if self.order is None:
            return "plain"
        g = (
            "per-σ-bin"
            if self.binned
            else {"tensor": "per-tensor", "element": "per-element"}.get(
                self.granularity, self.granularity
            )
        )
        if self.binned:
            g += " split" if self.split else " joint"
        return f"k={self.order} {g}" + (" (stacked)" if self.stack and self.order == 0 else "")

    def recipe(self) -> Recipe:
        """The benchmarked recipe: C^k (auto means) with this coefficient layout (running β)."""
        groups = SigmaBins(2e-3, 3.0, 8) if self.binned else 1
        forward = "split" if self.split else "joint"
        control = TaylorControl(order=self.order or 0, group_forward=forward, stack=self.stack)
        return Recipe(control=control, layout=CoefficientLayout(self.granularity, groups),
                      name=self.name)  # fmt: skip


def configs(orders: list[int]) -> list[Config]:
    out = [Config(None)]
    for k in orders:
        out += [
            Config(k, "scalar"),
            Config(k, "tensor"),
            Config(k, "element"),
            Config(k, "element", binned=True),
            Config(k, "element", binned=True, split=True),
        ]
        if k == 0:
            out += [Config(0, "element", stack=True), Config(0, "element", True, stack=True)]
    return out


def _setup(
    batch: int, device: str, seed: int = 0
) -> tuple[SmallUNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = SmallUNet(generator=g).to(device)
    x = torch.rand(batch, 1, 28, 28, generator=g).to(device) * 2 - 1
    sigma = torch.exp(torch.empty(batch).uniform_(-6, 1, generator=g)).to(device)
    eps = torch.randn(batch, 1, 28, 28, generator=g).to(device)
    return model, x, sigma, eps


def _stepper(cfg: Config, model: SmallUNet, device: str):
    if cfg.order is None:

        def plain(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> None:
            for p in model.parameters():
                p.grad = None
            dsm_loss(model, x, sigma, eps, validate=False).mean().backward()

        return plain
    ctrl = cfg.recipe().build(model, model.parameters(), validate=False)  # sync-free step
    gen = torch.Generator(device=device).manual_seed(1)

    def controlled(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> None:
        ctrl.step(x, sigma, eps, generator=gen)

    return controlled


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(cfgs: list[Config], batch: int, device: str, repeats: int) -> dict[str, float]:
    """Median seconds per step for every config, interleaved round-robin."""
    model, x, sigma, eps = _setup(batch, device)
    steps = {c.name: _stepper(c, model, device) for c in cfgs}
    for f in steps.values():  # warm-up (and running-β statistics)
        f(x, sigma, eps)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):
        for name, f in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            f(x, sigma, eps)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def memory_one(cfg: Config, batch: int, device: str) -> float:
    """Peak bytes one step needs above model + batch (this process)."""
    model, x, sigma, eps = _setup(batch, device)
    f = _stepper(cfg, model, device)
    if device.startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        f(x, sigma, eps)
        _sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    try:  # Linux: reset the peak RSS (VmHWM) to the current RSS, then read it back
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS")
        f(x, sigma, eps)
        return float(_status_kib("VmHWM") - base) * 1024.0
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        f(x, sigma, eps)
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024.0


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: current, ``VmHWM``: peak RSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_all(cfgs: list[Config], batch: int, device: str) -> dict[str, float]:
    """CUDA: in process; CPU: one fresh subprocess per config (peak RSS is monotone)."""
    out: dict[str, float] = {}
    for c in cfgs:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            out[c.name] = memory_one(c, batch, device)
            continue
        arg = json.dumps([c.order, c.granularity, c.binned, c.stack, c.split, batch, device])
        res = subprocess.run(
            [sys.executable, __file__, "--_memory", arg], capture_output=True, text=True, check=True
        )
        out[c.name] = float(res.stdout.strip().splitlines()[-1])
    return out


def table(cfgs: list[Config], t: dict[str, float], mem: dict[str, float] | None) -> str:
    rows = [
        "| config | s / step | time × plain | peak mem (MiB) | mem × plain |",
        "|---|---|---|---|---|",
    ]
    for c in cfgs:
        n = c.name
        m = "–" if mem is None else f"{mem[n] / 2**20:.0f}"
        mr = "–" if mem is None else f"{mem[n] / max(mem['plain'], 1.0):.2f}"
        rows.append(f"| {n} | {t[n]:.3f} | {t[n] / t['plain']:.2f} | {m} | {mr} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--orders", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="batch 32, 2 repeats")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._memory:
        order, gran, binned, stack, split, batch, device = json.loads(a._memory)
        print(memory_one(Config(order, gran, binned, stack, split), batch, device))
        return
    if a.quick:
        a.batch, a.repeats = min(a.batch, 32), min(a.repeats, 2)
    cfgs = configs([int(k) for k in a.orders.split(",") if k])
    t = time_all(cfgs, a.batch, a.device, a.repeats)
    mem = None if a.no_memory else memory_all(cfgs, a.batch, a.device)
    print(f"device={a.device} batch={a.batch} repeats={a.repeats} torch={torch.__version__}")
    print(table(cfgs, t, mem))


if __name__ == "__main__":
    main()
