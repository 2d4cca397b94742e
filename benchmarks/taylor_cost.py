"""Cost and variance of TaylorCV: wall time relative to one f evaluation, and probe-mean variance.

Part 1 (cost): ``f`` an MLP ``d → 256 → 256 → 1`` (tanh) on ``n = 256`` samples, float32;
for ``d ∈ {2, 32, 784}`` and ``k ∈ {0..4}`` the median wall time of ``cv(eps)`` with
the exact mean and with the probe mean (one Gaussian probe per sample), divided by
the median time of ``f(eps)`` measured in the same run.

Part 2 (variance, float64): ``VR = Var(f − cv) / Var f`` per sample for the exact mean,
Gaussian and Rademacher probe means (even orders only), and the naive alternative
that subtracts the whole polynomial at an independent draw, ``T^k(ε) − T^k(ε')``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/taylor_cost.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from varred.errors import VarRedError
from varred.taylor import TaylorCV

DIMS = (2, 32, 784)
ORDERS = (0, 1, 2, 3, 4)


def mlp(d: int, generator: torch.Generator, dtype: torch.dtype) -> torch.nn.Module:
    """``d → 256 → 256 → 1`` tanh MLP with deterministic weights."""
    net = torch.nn.Sequential(
        torch.nn.Linear(d, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh()
    )
    net.append(torch.nn.Linear(256, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / max(1, p.shape[-1]) ** 0.5)
    return net.to(dtype)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cost_table(repeats: int, n: int = 256) -> str:
    g = torch.Generator().manual_seed(0)
    rows = ["| d | k | exact / f | probe / f | exact route |", "|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for d in DIMS:
        net = mlp(d, g, torch.float32)

        def f(x: torch.Tensor, net: torch.nn.Module = net) -> torch.Tensor:
            return net(x)[:, 0]  # [n, d] -> [n]

        eps = torch.randn(n, d, generator=g)
        t_f = median_time(lambda f=f, eps=eps: f(eps), 5 * repeats)
        print(f"<!-- d={d}: one f(eps) takes {1e3 * t_f:.3f} ms -->", flush=True)
        for k in ORDERS:
            exact = TaylorCV(f, k)
            probe = TaylorCV(f, k, expectation="probe")
            try:
                route = exact.exact_route(d) if k >= 2 else "none needed"
                t_exact = f"{median_time(lambda c=exact, e=eps: c(e), repeats) / t_f:.1f}"
            except VarRedError:
                route, t_exact = "-", "n/a (exact infeasible)"
            pg = torch.Generator().manual_seed(1)
            t_probe = median_time(lambda c=probe, e=eps, pg=pg: c(e, generator=pg), repeats) / t_f
            rows.append(f"| {d} | {k} | {t_exact} | {t_probe:.1f} | {route} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def variance_table(n: int) -> str:
    """VR for the MLP at d = 32 with x = σ ε, several σ; float64."""
    g = torch.Generator().manual_seed(2)
    d = 32
    net = mlp(d, g, torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x)[:, 0]

    rows = [
        "| σ | k | exact | probe gauss | probe rademacher | whole poly at ε' |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for sigma in (0.1, 0.5, 1.0):
        L = sigma * torch.eye(d, dtype=torch.float64)
        eps = torch.randn(n, d, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fx = f(eps @ L.T)
        var_f = float(fx.var())
        for k in (2, 3):
            cols = []
            for kind, dist in (
                ("exact", "gaussian"),
                ("probe", "gaussian"),
                ("probe", "rademacher"),
            ):
                cv = TaylorCV(f, k, scale_tril=L, expectation=kind, probe_distribution=dist)
                c = cv(eps, generator=g).detach()
                cols.append(float((fx - c).var()) / var_f)
            poly = TaylorCV(f, k, scale_tril=L).polynomial
            other = torch.randn(n, d, generator=g, dtype=torch.float64)
            naive = (poly(eps) - poly(other)).detach()
            cols.append(float((fx - naive).var()) / var_f)
            rows.append(f"| {sigma} | {k} | " + " | ".join(f"{v:.3g}" for v in cols) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-variance", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("## TaylorCV cost relative to one f(eps) (median wall time, float32, n=256)\n")
    cost_table(repeats=3 if args.quick else 7)
    if not args.skip_variance:
        print("\n## Var(f − cv) / Var f per sample (MLP d=32, x = σ ε, float64)\n")
        variance_table(n=2000 if args.quick else 20000)


if __name__ == "__main__":
    main()
