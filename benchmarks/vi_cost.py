"""Cost of the VI gradient controls: controlled / plain time per step for d ∈ {10, 100, 1000}.

Bayesian logistic regression on synthetic data (N = 200 rows, d features), mean-field
Gaussian, batch of n draws. Plain = ``elbo_grads``; controlled = ``ELBOControl.per_sample``
plus the per-block cross-fitted estimate. Control means by probes (``--probes``, unbiased)
and, for d ≤ 100, exactly (d directional derivatives per step).

    python benchmarks/vi_cost.py --n 16 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch

from varred.coefficients import OptimalCoefficient
from varred.estimate import estimate
from varred.vi.control import ELBOControl
from varred.vi.families import GaussianFamily
from varred.vi.gradient import elbo_grads


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"n = {args.n} draws per step, {args.repeats} repeats, 1 thread, float64")
    print(f"{'d':>5s} {'plain ms':>9s} {'control':>22s} {'ms':>9s} {'ratio':>7s}")
    for d in args.dims:
        x = torch.randn(200, d, generator=g, dtype=torch.float64) / d**0.5
        sgn = torch.where(torch.rand(200, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)

        def log_p(z, x=x, sgn=sgn):
            return torch.nn.functional.logsigmoid(sgn * (z @ x.T)).sum(1) - 0.5 * (z**2).sum(1)

        q = GaussianFamily(0.1 * torch.randn(d, generator=g, dtype=torch.float64), 0.3)
        eps = q.sample_noise(args.n, g)
        t_plain = _time(lambda q=q, lp=log_p, e=eps: elbo_grads(q, lp, e), args.repeats)
        print(f"{d:5d} {1e3 * t_plain:9.2f}")
        configs = [("STL", 0, "stl", "probe")]
        for order in (1, 2):
            configs.append((f"order {order}, probe", order, "none", "probe"))
            if d <= 100:
                configs.append((f"order {order}, exact", order, "none", "exact"))
        for name, order, stl, expectation in configs:
            ctrl = ELBOControl(q, log_p, order=order, stl=stl, expectation=expectation,
                               probes=args.probes,
                               coefficient=OptimalCoefficient(kind="scalar", fit="crossfit", folds=2))  # fmt: skip

            def step(ctrl=ctrl, eps=eps):
                for b, (f, c) in ctrl.per_sample(eps, g).items():
                    estimate(f, c, ctrl.coefficients[b] if c is not None else None)

            t = _time(step, args.repeats)
            print(f"{'':5s} {'':9s} {name:>22s} {1e3 * t:9.2f} {t / t_plain:7.2f}")


if __name__ == "__main__":
    main()
