"""Cost of ``vd.AutoStep`` relative to a plain recipe step, where no control pays.

``SmallUNet`` (base 16) on MNIST-sized batches, as ``varred-repro train`` trains it. Two
numbers, each a ratio of process CPU times measured in one run, auto and plain
interleaved step by step (so both see the same machine load):

- *outside the probe windows*: auto's step once it has kept no control bin;
- *amortised*: over whole recheck periods (``probe_steps`` probe steps, half of them
  controlled in every bin, then plain steps), the price of re-checking; reported for the
  measured period and projected to ``varred-repro train``'s period (40 probe steps every 1,000).

The issue's promise is a ratio within 1.10 where nothing pays. Images are random
(cost does not depend on them), so no data is needed.

Usage::

    python benchmarks/auto_step.py              # one thread, period 200, 2 periods
    python benchmarks/auto_step.py --quick      # period 40, 1 period
"""

from __future__ import annotations

import argparse
import time

import torch

import varred_diffusion as vd
from varred_diffusion.models import SmallUNet


def _build(seed: int, auto: bool, period: int, probe: int) -> tuple:
    model = SmallUNet(1, base=16, generator=torch.Generator().manual_seed(seed))
    if auto:
        bins = vd.SigmaBins(0.01, 10.0, 4)
        step = vd.AutoStep(model, model.parameters(), bins=bins, probe_steps=probe,
                           recheck_every=period, clock=time.process_time)  # fmt: skip
    else:
        step = vd.Recipe(sampler=vd.LogUniformSigma(0.01, 10.0)).build(
            model, model.parameters(), validate=False
        )
    return step, torch.Generator().manual_seed(seed + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--period", type=int, default=200, help="recheck_every of the measured auto")
    ap.add_argument("--probe", type=int, default=40, help="probe_steps of the measured auto")
    ap.add_argument("--periods", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.period, a.probe, a.periods = 40, 8, 1
    torch.set_num_threads(a.threads)
    x = torch.rand(a.batch, 1, 28, 28) * 2 - 1
    auto, ga = _build(0, True, a.period, a.probe)
    plain, gp = _build(0, False, a.period, a.probe)
    for _ in range(2):  # warm-up (allocations) outside the measured periods
        plain(x, generator=gp)
    t_auto, t_plain, t_probe, n_probe = 0.0, 0.0, 0.0, 0
    for i in range(a.period * a.periods):
        for name in ("auto", "plain") if i % 2 == 0 else ("plain", "auto"):
            step, g = (auto, ga) if name == "auto" else (plain, gp)
            probing = name == "auto" and step.probing
            t0 = time.process_time()
            step(x, generator=g)
            dt = time.process_time() - t0
            if name == "plain":
                t_plain += dt
            else:
                t_auto += dt
                t_probe, n_probe = t_probe + dt * probing, n_probe + probing
    steps = a.period * a.periods
    plain_per = t_plain / steps
    outside = (t_auto - t_probe) / (steps - n_probe) / plain_per
    probe_per = t_probe / n_probe / plain_per
    projected = (40 * probe_per + (1000 - 40) * outside) / 1000
    print(
        f"SmallUNet base 16, batch {a.batch}, {a.threads} thread(s), plain step {plain_per * 1e3:.1f} ms"
    )
    print(f"auto's decisions: {[d['active_bins'] for d in auto.decisions]}")
    print(f"auto / plain outside the probe windows: {outside:.3f}")
    print(f"auto / plain inside a probe window:     {probe_per:.3f}")
    print(f"auto / plain amortised, {a.probe} probe steps every {a.period}: {t_auto / t_plain:.3f}")
    print(f"projected, 40 probe steps every 1,000 (varred-repro train): {projected:.3f}")


if __name__ == "__main__":
    main()
