"""Eight schools (Rubin 1981), non-centred, d = 10: VI gradient variance per block.

``y_j ~ N(μ + τ θ̃_j, σ_j)``, ``μ ~ N(0, 5)``, ``τ ~ HalfCauchy(5)`` (sampled as ``log τ``,
Jacobian included), ``θ̃_j ~ N(0, 1)``. Data inline.

    python examples/vi_eight_schools.py --kind fullrank --reps 50 --batch 16
"""

from __future__ import annotations

import argparse
import math

import torch
from vi_common import fit, measure

from varred.vi.families import GaussianFamily

Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def make_log_p(dtype=torch.float64):
    y, s = torch.tensor(Y, dtype=dtype), torch.tensor(SIGMA, dtype=dtype)

    def log_p(z):  # [n, 10] = (μ, log τ, θ̃_1..8) -> [n]
        mu, log_tau, th = z[:, 0], z[:, 1], z[:, 2:]
        tau = log_tau.exp()
        theta = mu[:, None] + tau[:, None] * th
        lik = -0.5 * (((y - theta) / s) ** 2).sum(1)
        prior = -0.5 * (mu / 5) ** 2 - torch.log1p((tau / 5) ** 2) + log_tau - 0.5 * (th**2).sum(1)
        return lik + prior

    return log_p


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="meanfield", choices=["meanfield", "fullrank"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log_p = make_log_p()
    g = torch.Generator().manual_seed(args.seed)
    q = GaussianFamily(torch.zeros(10, dtype=torch.float64), 1.0, kind=args.kind)
    print(f"eight schools (non-centred), d = 10, {args.kind}")
    fit(q, log_p, steps=args.fit_steps, batch=8, lr=0.02, generator=g)
    out = measure(q, log_p, reps=args.reps, batch=args.batch, generator=g)
    print(
        f"posterior mean of μ ≈ {float(q.loc.detach()[0]):.2f}, median τ ≈ {math.exp(float(q.loc.detach()[1])):.2f}"
    )
    return out


if __name__ == "__main__":
    main()
