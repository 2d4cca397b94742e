"""Overhead of ``varred.GradientControl.backward`` relative to a plain ``losses.mean().backward()``.

Models: ``varred_diffusion.SmallUNet`` (~0.6M parameters in ~100 tensors, ``[B, 1, 28, 28]``)
and an MLP score on ``[B, 2]``. Losses are per-sample DSM losses and the controls the k = 0
DSM Taylor control ``C^0`` (both from the model, computed once per repeat). Per configuration,
in one process and interleaved, medians over repeats of:

* ``plain``: ``losses.mean().backward()``;
* ``grads``: the two ``torch.autograd.grad`` calls a controlled step makes (losses; controls,
  batched over the G group masks when ``G > 1``);
* ``ctrl``: ``GradientControl.backward(losses, controls, groups)`` (running β, past warm-up).

Reported ratios: ``ctrl / plain`` (the backward part of a step), ``grads / plain`` (autograd
work alone) and ``(ctrl − grads) / plain`` (the statistics overhead: flattening, moments, β,
diagnostics, writing ``.grad``). The forward passes are excluded from all three.

``--baseline REV`` (default: the commit of the per-parameter implementation) also times that
revision of ``src/varred/gradient.py``, loaded from git into a private module, for a
before/after table; it is skipped when git or the revision is unavailable.

Usage::

    python benchmarks/gradient_control_overhead.py                 # CPU, UNet batch 32
    python benchmarks/gradient_control_overhead.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from varred.gradient import GradientControl
from varred_diffusion import dsm_loss, dsm_taylor_cv
from varred_diffusion.models import SmallUNet

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "7def062"  # per-parameter Python loops (before the flat-buffer rewrite)


class MLP(torch.nn.Module):
    """Score MLP ``[B, 2], [B] -> [B, 2]`` on ``[x, log σ]`` (4 layers, width 256)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(3, width), torch.nn.SiLU()]
        for _ in range(2):
            layers += [torch.nn.Linear(width, width), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, torch.log(sigma)[:, None]], 1))


def load_baseline(rev: str) -> ModuleType | None:
    """``src/varred/gradient.py`` at git revision ``rev`` as a private module, or ``None``."""
    try:
        src = subprocess.run(
            ["git", "-c", "safe.directory=*", "show", f"{rev}:src/varred/gradient.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "gradient_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("_gradient_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build(name: str, batch: int, device: torch.device, gen: torch.Generator):
    """Model and a batch-drawing function returning ``(x, sigma, eps)``."""
    if name == "unet":
        model: torch.nn.Module = SmallUNet(generator=gen)
        shape: tuple[int, ...] = (batch, 1, 28, 28)
    else:
        model, shape = MLP(), (batch, 2)
    model = model.to(device)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(shape, generator=gen).to(device)
        sigma = torch.exp(torch.empty(batch).uniform_(-5, 0, generator=gen)).to(device)
        return x, sigma, torch.randn(shape, generator=gen).to(device)

    return model, draw


def measure(args: argparse.Namespace, model_name: str, groups_n: int, impls: dict) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    model, draw = build(model_name, args.batch, device, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = (torch.arange(args.batch) % groups_n).to(device) if groups_n > 1 else None
    ctrls = {
        k: mod.GradientControl(params, num_groups=groups_n, warmup_steps=1, validate=False)
        for k, mod in impls.items()
    }  # fmt: skip

    def forward():
        x, sigma, eps = draw()
        return dsm_loss(model, x, sigma, eps), dsm_taylor_cv(model, x, sigma, eps, order=0)

    def plain() -> None:
        losses, _ = forward()
        t = timed(lambda: losses.mean().backward(), device)
        times["plain"].append(t)

    def grads() -> None:
        losses, controls = forward()

        def run() -> None:
            b = losses.shape[0]
            torch.autograd.grad(losses, params, torch.full_like(losses, 1 / b), retain_graph=True)
            if groups is None:
                torch.autograd.grad(controls, params, torch.full_like(controls, 1 / b))
            else:
                masks = (groups[None] == torch.arange(groups_n, device=device)[:, None]) / b
                torch.autograd.grad(
                    controls, params, masks.to(controls.dtype), is_grads_batched=True
                )

        times["grads"].append(timed(run, device))

    def ctrl(key: str) -> Callable[[], None]:
        def run() -> None:
            losses, controls = forward()
            times[key].append(timed(lambda: ctrls[key].backward(losses, controls, groups), device))

        return run

    steps = {"plain": plain, "grads": grads} | {k: ctrl(k) for k in ctrls}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.warmup + args.repeats):
        for fn in steps.values():  # interleaved
            fn()
        if rep < args.warmup:
            for v in times.values():
                v.clear()
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.profile:
        losses, controls = forward()
        with torch.profiler.profile() as prof:
            ctrls["after"].backward(losses, controls, groups)
            sync(device)
        print(f"{model_name} G={groups_n}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {
        "model": model_name,
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "groups": groups_n,
        **med,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="UNet batch (default 32 CPU, 128 CUDA)")
    ap.add_argument("--mlp-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--models", nargs="+", default=["unet", "mlp"], choices=["unet", "mlp"])
    ap.add_argument("--profile", action="store_true", help="print a profile of one step")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision, or '' for none")
    args = ap.parse_args(argv)
    unet_batch = args.batch or (128 if args.device.startswith("cuda") else 32)
    impls: dict[str, ModuleType] = {"after": sys.modules[GradientControl.__module__]}
    base = load_baseline(args.baseline) if args.baseline else None
    if base is not None:
        impls = {"before": base, **impls}
    rows = []
    for model_name in args.models:
        args.batch = unet_batch if model_name == "unet" else args.mlp_batch
        for g in args.groups:
            rows.append(measure(args, model_name, g, impls) | {"batch": args.batch})
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nGradientControl overhead on {dev} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), medians of {args.repeats}; ratios to plain "
          "backward\n")  # fmt: skip
    head = "| model | P (tensors) | B | G | impl | ctrl / plain | grads / plain | stats / plain | plain ms |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        for k in impls:
            print(
                f"| {r['model']} | {r['params']} ({r['tensors']}) | {r['batch']} | {r['groups']} "
                f"| {k} | {r[k] / r['plain']:.2f} | {r['grads'] / r['plain']:.2f} "
                f"| {(r[k] - r['grads']) / r['plain']:.2f} | {1e3 * r['plain']:.1f} |"
            )


if __name__ == "__main__":
    main()
