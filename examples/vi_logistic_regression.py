"""Bayesian logistic regression on scikit-learn's breast-cancer data: VI gradient variance.

Prior N(0, I) on 30 standardised weights and an intercept (d = 31); Gaussian variational
family (mean-field or full-rank). Needs scikit-learn (``pip install -e '.[examples]'``).

    python examples/vi_logistic_regression.py --kind meanfield --reps 50 --batch 16
"""

from __future__ import annotations

import argparse

import torch
from vi_common import fit, measure

from varred.vi.families import GaussianFamily


def load(dtype=torch.float64):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(x, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0)
    x = torch.cat([torch.ones(x.shape[0], 1, dtype=dtype), x], 1)  # [569, 31]
    return x, 2 * torch.as_tensor(y, dtype=dtype) - 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="meanfield", choices=["meanfield", "fullrank"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, sgn = load()

    def log_p(z):  # [n, 31] -> [n]
        return torch.nn.functional.logsigmoid(sgn * (z @ x.T)).sum(1) - 0.5 * (z**2).sum(1)

    g = torch.Generator().manual_seed(args.seed)
    q = GaussianFamily(torch.zeros(x.shape[1], dtype=x.dtype), 0.1, kind=args.kind)
    print(f"breast cancer logistic regression, d = {x.shape[1]}, {args.kind}")
    fit(q, log_p, steps=args.fit_steps, batch=8, lr=0.02, generator=g)
    return measure(q, log_p, reps=args.reps, batch=args.batch, generator=g)


if __name__ == "__main__":
    main()
