"""Speed of the Fréchet evaluation: 2,000 samples, features + Fréchet distance, on CPU.

Measures, with ``--threads`` torch threads (default 2: the target is "< 2 minutes on two
cores"):

1. ``evaluator``: building the Fashion-MNIST evaluator when the classifier is cached
   (load + embed the 2,000 held-out reference images);
2. ``frechet``: one evaluation of 2,000 generated images, i.e. classifier features of the
   2,000 images + mean/covariance + Fréchet distance (what repeats per checkpoint; sample
   generation excluded), median of ``--repeats``;
3. ``generation``: drawing 2,000 images from an (untrained) ``SmallUNet`` with the EDM
   Heun sampler at ``--steps`` levels (``2 steps − 1`` network evaluations), reported
   separately; ``--gen-count`` draws fewer and scales linearly.

The classifier is trained first if it is not cached (``--cache-dir``; about 3.5 CPU-minutes)
and that time is reported too.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/frechet_speed.py [--threads 2] [--steps 18]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from varred_diffusion.experiments.heun import edm_sigma_steps, heun_sample
from varred_diffusion.experiments.quality import DEFAULT_FRECHET_COUNT, fashion_mnist_evaluator
from varred_diffusion.models import SmallUNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--count", type=int, default=DEFAULT_FRECHET_COUNT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=18, help="Heun levels (2 steps - 1 NFE)")
    ap.add_argument("--base", type=int, default=32, help="SmallUNet base channels")
    ap.add_argument("--gen-count", type=int, default=None,
                    help="images actually generated (time scaled to --count); default --count")  # fmt: skip
    ap.add_argument("--gen-batch", type=int, default=250)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default="cpu", help="device for generation (cpu or cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, float | int | str] = {"threads": args.threads, "count": args.count}

    t0 = time.perf_counter()
    ev, acc = fashion_mnist_evaluator(count=args.count, cache_dir=args.cache_dir, progress=True)
    out["evaluator_s"] = time.perf_counter() - t0  # includes training if not cached
    out["classifier_test_accuracy"] = acc

    g = torch.Generator().manual_seed(0)
    fake = torch.rand(args.count, 1, 28, 28, generator=g) * 2 - 1  # stands in for samples
    times, fd = [], float("nan")
    for _ in range(args.repeats):
        t = time.perf_counter()
        fd = ev.evaluate(fake)
        times.append(time.perf_counter() - t)
    out["frechet_s_median"] = statistics.median(times)
    out["frechet_of_uniform_noise"] = fd

    net = SmallUNet(1, base=args.base, generator=torch.Generator().manual_seed(0))
    net = net.to(args.device).eval()
    n_gen = args.gen_count or args.count
    noise = torch.randn(n_gen, 1, 28, 28, generator=g).to(args.device)
    sig = edm_sigma_steps(args.steps, 0.01, 10.0, dtype=torch.float32)
    t = time.perf_counter()
    x = heun_sample(net, noise, sig, batch_size=args.gen_batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    gen = time.perf_counter() - t
    out.update({"heun_steps": args.steps, "nfe": 2 * args.steps - 1, "unet_base": args.base,
                "generated": n_gen, "generation_s_measured": gen,
                "generation_s_for_count": gen * args.count / n_gen, "device": args.device})  # fmt: skip
    t = time.perf_counter()
    out["frechet_of_untrained_unet_samples"] = ev.evaluate(x.cpu())
    out["frechet_s_on_samples"] = time.perf_counter() - t
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
