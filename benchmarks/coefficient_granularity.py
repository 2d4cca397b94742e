"""Running-β granularity in a real training loop: which coefficient layout pays, and when.

Trains a small MLP score model on the 8-Gaussian ring with a ``vd.Recipe`` step (C^0,
σ log-uniform in [1e-3, 10], Adam) for each granularity (scalar / per-tensor /
per-element, and per-element shrunk toward per-tensor β with ``shrinkage`` κ) with and
without 8 log-σ bins, and prints ``GradientControl``'s running
estimate of tr Var(applied gradient) / tr Var(plain gradient) at a few steps.
Same seeds for every row, so the rows differ only in the coefficient layout.

    python benchmarks/coefficient_granularity.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch

import varred_diffusion as vd
from varred.layout import CoefficientLayout


def run(
    granularity: str,
    bins: bool,
    steps: int,
    report: tuple[int, ...],
    shrinkage: float = 0.0,
    seed: int = 0,
) -> list[float]:
    g = torch.Generator().manual_seed(2 * seed)
    data = vd.ring8()
    model = vd.MLPScore(2, width=64, depth=2, generator=torch.Generator().manual_seed(2 * seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    groups = vd.SigmaBins(1e-3, 10.0, 8) if bins else 1
    layout = CoefficientLayout(granularity, groups, shrinkage)
    step = vd.Recipe(control=vd.TaylorControl(order=0), layout=layout).build(
        model, model.parameters()
    )
    out = []
    for i in range(steps):
        x = data.sample(128, g).float()
        sigma = vd.log_uniform_sigma(torch.rand(128, generator=g), 1e-3, 10.0)
        noise = torch.randn(x.shape, generator=g)
        opt.zero_grad()
        diag = step(x, sigma, noise)
        opt.step()
        if i + 1 in report:
            out.append(float(diag["variance_ratio"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument(
        "--shrinkage", default="10,100", help="κ values for extra per-element rows (comma list)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = tuple(s for s in (20, 50, 100, 200, 300, 500, 1000) if s <= args.steps)
    print("| granularity | σ bins | " + " | ".join(f"VR @ {s}" for s in report) + " |")
    print("|---|---|" + "---|" * len(report))
    rows = [(g, b, 0.0) for g in ("scalar", "tensor", "element") for b in (False, True)]
    rows += [
        ("element", b, float(k)) for k in args.shrinkage.split(",") if k for b in (False, True)
    ]
    for granularity, bins, kappa in rows:
        vr = run(granularity, bins, args.steps, report, kappa, args.seed)
        cells = " | ".join(f"{v:.3g}" for v in vr)
        name = granularity + (f", shrinkage κ={kappa:g}" if kappa else "")
        print(f"| {name} | {'8' if bins else '-'} | {cells} |")


if __name__ == "__main__":
    main()
