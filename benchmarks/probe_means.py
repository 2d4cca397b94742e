"""Exact versus unbiased-probe means of the DSM Taylor controls: how much variance probes give back.

For C^0 (exact, never needs probes) and C^1 with exact, Hutchinson and Gaussian-probe
means, the variance ratio of the per-sample gradient (per-element β fitted on independent
draws, ``varred_diffusion.gradient_variance_ratio``) on the 8-Gaussian ring (d = 2) and on
standard-normal data in d = 32, with a tanh ``MLPScore`` at initialisation, by σ. Each
cell is "VR ± its standard error" (delete-one-block jackknife over the evaluation draws,
given the fitted β: ``VarianceRatio.ratio_stderr``).

    python benchmarks/probe_means.py [--units 256]
"""

from __future__ import annotations

import argparse

import torch

import varred_diffusion as vd


def draw_fn(d: int, sigma: float):  # type: ignore[no-untyped-def]
    ring = vd.ring8()

    def draw(n: int, g: torch.Generator):  # type: ignore[no-untyped-def]
        x = ring.sample(n, g) if d == 2 else torch.randn(n, d, generator=g, dtype=torch.float64)
        s = torch.full((n,), sigma, dtype=torch.float64)
        return x, s, torch.randn(n, d, generator=g, dtype=torch.float64)

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sigmas = (1e-3, 1e-2, 0.1, 1.0)
    print("| d | k | mean | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " |")
    print("|---|---|---|" + "---|" * len(sigmas))
    for d in (2, 32):
        model = vd.MLPScore(d, width=32, depth=2, activation="tanh",
                            generator=torch.Generator().manual_seed(1)).double()  # fmt: skip
        for order, method in ((0, "exact"), (1, "exact"), (1, "hutchinson"), (1, "probe")):
            cells = []
            for sigma in sigmas:
                vr = vd.gradient_variance_ratio(
                    model, draw_fn(d, sigma), order=order, expectation=method,
                    generator=torch.Generator().manual_seed(0), num_fit=args.units,
                    num_eval=args.units, kinds=("element",),
                )  # fmt: skip
                cells.append(f"{vr.ratio['element']:.3g} ± {vr.ratio_stderr['element']:.2g}")
            print(f"| {d} | {order} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
