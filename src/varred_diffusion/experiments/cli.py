"""``varred-repro``: reproduce Jeha et al. (2024) and the leaderboard of techniques.

Subcommands: ``toy`` (figures 1, 2), ``grid`` (figure 5), ``optimizers`` (figure 4),
``mnist`` (figure 3), ``leaderboard`` (every technique, one table), ``all``.
Each writes PNG figures, CSV and JSON tables and ``summary.md`` (atomically) under
``--out`` (default ``results/<subcommand>``). Same ``--seed`` → same numbers (CPU).

Examples::

    varred-repro toy                      # about two minutes on two CPU cores
    varred-repro toy --quick --out /tmp/t # seconds
    varred-repro mnist --checkpoint-every 100 --resume
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.common import Context

__all__ = ["build_parser", "main"]

SUBCOMMANDS = ("toy", "grid", "optimizers", "mnist", "leaderboard")
#: Not part of ``all``: ``train`` is the long time-to-quality comparison.
EXTRA_SUBCOMMANDS = ("train",)


def _runner(name: str) -> Callable[[Context], Any]:
    if name == "toy":
        from varred_diffusion.experiments.toy import run_toy

        return run_toy
    if name == "grid":
        from varred_diffusion.experiments.grid import run_grid

        return run_grid
    if name == "optimizers":
        from varred_diffusion.experiments.optimizers import run_optimizers

        return run_optimizers
    if name == "mnist":
        from varred_diffusion.experiments.mnist import run_mnist

        return run_mnist
    if name == "leaderboard":
        from varred_diffusion.experiments.leaderboard import run_leaderboard

        return run_leaderboard
    if name == "train":
        from varred_diffusion.experiments.train import run_train

        return run_train
    raise VarRedError(
        f"subcommand: expected one of {SUBCOMMANDS + EXTRA_SUBCOMMANDS}, got {name!r}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per experiment, common options on each)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    common.add_argument(
        "--steps", type=int, default=None, help="training steps (default: per experiment)"
    )
    common.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cuda (default cpu; random draws always come from CPU generators)",
    )
    common.add_argument(
        "--out", type=Path, default=None, help="output folder (default results/<subcommand>)"
    )
    common.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    common.add_argument("--resume", action="store_true", help="continue from checkpoints in --out")
    common.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="checkpoint every N training steps (0: only at the end with --resume)")  # fmt: skip
    common.add_argument("--no-progress", action="store_true", help="disable progress bars")
    common.add_argument(
        "--data-dir", default=None, help="MNIST-format IDX folder (mnist, leaderboard)"
    )
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser = argparse.ArgumentParser(
        prog="varred-repro", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "toy": "figures 1, 2: training curves, variance ratio and β of C^0..C^2 (2-D mixture)",
        "grid": "figure 5: variance ratio over MLP widths × depths × activations",
        "optimizers": "figure 4: variance ratio during training with Adam vs SGD",
        "mnist": "figure 3: SmallUNet on MNIST, variance ratio, loss, samples",
        "leaderboard": "every technique: variance ratio, step time, efficiency (toy and MNIST)",
        "all": "run every experiment above in turn",
        "train": "time to quality: recipes trained side by side (Fashion-MNIST or MNIST)",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name in ("toy", "optimizers", "grid", "leaderboard", "all"):
            p.add_argument("--dataset", default="ring8", choices=("ring8", "asymmetric"),
                           help="2-D data (default ring8)")  # fmt: skip
        if name == "train":
            p.add_argument(
                "--dataset",
                default="fashion-mnist",
                choices=("fashion-mnist", "mnist"),
                help="image data (default fashion-mnist, full 60k/10k split)",
            )
            p.add_argument(
                "--budget",
                type=float,
                default=None,
                help="training seconds (on --clock) per recipe and seed (default 1200)",
            )
            p.add_argument(
                "--images",
                type=int,
                default=None,
                help="images seen per recipe and seed in the equal-images runs",
            )
            p.add_argument(
                "--seeds",
                type=int,
                default=None,
                help="seeds (default 3; --set first_seed=N runs seeds N, N+1, ...)",
            )
            p.add_argument(
                "--fd-count",
                type=int,
                default=None,
                help="generated images for the Fréchet distance (default 2000; 0: off)",
            )
            p.add_argument(
                "--set",
                default=None,
                metavar="K=V,...",
                help="other TrainSettings fields, e.g. eval_every=40,val_size=256",
            )
            p.add_argument("--clock", default=None, choices=("auto", "cpu", "wall"),
                           help="budget clock: process CPU time or wall-clock (auto: CPU time "
                                "on the CPU, wall-clock on CUDA)")  # fmt: skip
            p.add_argument("--schedule", default=None, choices=("sequential", "in-turns"),
                           help="one run after another (default), or a seed's recipes in turns "
                                "in one process: all meet the same machine load")  # fmt: skip
            p.add_argument("--modes", default=None, metavar="M,...",
                           help="budgets to run: wallclock,images (default both)")  # fmt: skip
            p.add_argument(
                "--without-plain",
                action="store_true",
                help="leave plain out (a run to merge with one that has it)",
            )
            p.add_argument(
                "--merge",
                nargs="+",
                default=None,
                metavar="DIR",
                help="train nothing: one report from earlier runs' directories",
            )
            p.add_argument("--recipes", default=None,
                           help="semicolon-separated recipe names to keep besides plain (default all)")  # fmt: skip
    return parser


def _context(args: argparse.Namespace, name: str, out: Path | None) -> Context:
    return Context(
        out=out if out is not None else Path("results") / name,
        seed=args.seed,
        steps=args.steps,
        device=args.device,
        quick=args.quick,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        data_dir=args.data_dir,
        extra=_extra(args, name),
    )


def _extra(args: argparse.Namespace, name: str) -> dict:
    """Subcommand-specific options for ``Context.extra``."""
    if name != "train":
        return {"dataset": getattr(args, "dataset", "ring8")}
    names = {"budget": "budget_s", "images": "images", "seeds": "seeds", "fd_count": "fd_count"}
    settings = {k: getattr(args, a) for a, k in names.items() if getattr(args, a, None) is not None}
    for item in (args.set or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            try:
                settings[key.strip()] = float(value) if "." in value else int(value)
            except ValueError as exc:
                raise VarRedError(f"--set: expected K=V with a number V, got {item!r}") from exc
    if args.clock is not None:
        settings["clock"] = args.clock
    if args.schedule is not None:
        settings["schedule"] = args.schedule
    if args.modes is not None:
        settings["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    extra: dict = {"dataset_name": args.dataset, "train_settings": settings}
    if args.without_plain:
        extra["without_plain"] = True
    if args.merge:
        extra["merge"] = [Path(d) for d in args.merge]
    if args.recipes:
        extra["recipes"] = [r.strip() for r in args.recipes.split(";") if r.strip()]
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``varred-repro``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        print("note: bit-for-bit reproducibility is only promised on the CPU", file=sys.stderr)
    names = SUBCOMMANDS if args.command == "all" else (args.command,)
    try:
        for name in names:
            out = args.out / name if (args.out is not None and args.command == "all") else args.out
            ctx = _context(args, name, out)
            t0 = time.perf_counter()
            _runner(name)(ctx)
            print(f"{name}: wrote {ctx.out} in {time.perf_counter() - t0:.1f} s", flush=True)
    except VarRedError as exc:
        print(f"varred-repro: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
