"""A diffusers-style rectified-flow (flow-matching) loop with varred's control on the gradient.

The loop is the one SD3/Flux-style trainers write: ``UNet2DModel`` predicts the velocity
``v = ε − x`` at ``x_t = (1 − t) x + t ε`` with ``t`` logit-normal (Esser et al., 2024), the loss
is the velocity MSE, wrapped in ``accelerate.Accelerator``. The lines marked ``# varred`` are all
that varred adds: a recipe whose weighting makes its loss the FM loss exactly and whose control is
the flow-matching Taylor control ``C^0`` (β per element and t-quantile bin). With ``--no-varred``
the step is the plain loop, unchanged.

    python examples/train_flow_matching.py --synthetic 64 --resolution 8 --block_out_channels 8 16 \\
        --norm_num_groups 4 --max_train_steps 3      # seconds, no data needed
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DModel
from torch.utils.data import DataLoader, TensorDataset

import varred_diffusion as vd  # varred
from varred import CoefficientLayout  # varred


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="IDX directory (default: Fashion-MNIST)")
    p.add_argument("--synthetic", type=int, default=0, help="N random images instead of data")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--norm_num_groups", type=int, default=8)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--max_train_steps", type=int, default=200)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--num_bins", type=int, default=4, help="t-quantile bins for β")
    p.add_argument("--no-varred", dest="varred", action="store_false", help="the plain FM step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force the CPU (accelerate)")
    return p.parse_args(argv)


def load_dataset(args: argparse.Namespace, generator: torch.Generator) -> TensorDataset:
    """Images ``[N, 1, R, R]`` in ``[-1, 1]``: an IDX split padded/resized to R, or noise."""
    r = args.resolution
    if args.synthetic:
        return TensorDataset(torch.rand(args.synthetic, 1, r, r, generator=generator) * 2 - 1)
    from varred_diffusion.experiments.data import load_images

    x = load_images(args.data_dir or "/usr/share/datasets/fashion-mnist", split="train")
    x = F.pad(x, [2] * 4, value=-1.0) if r == 32 else F.interpolate(x, size=(r, r))
    return TensorDataset(x)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    generator = torch.Generator().manual_seed(args.seed)  # the loop's randomness, explicit
    n = len(args.block_out_channels)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(args.seed)
        model = UNet2DModel(
            sample_size=args.resolution, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=tuple(args.block_out_channels),
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            norm_num_groups=args.norm_num_groups,
        )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    loader = DataLoader(load_dataset(args, generator), batch_size=args.train_batch_size,
                        shuffle=True, drop_last=True, generator=generator)  # fmt: skip
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unet = accelerator.unwrap_model(model)
    velocity = vd.ScoreFromVelocity(lambda x, t: unet(x, 1000 * t).sample)  # varred
    bins = vd.QuantileBins.from_samples(  # varred: t-quantile bins for β
        torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(1))), args.num_bins
    )
    step = vd.Recipe(  # varred: FM loss (λ = t²/(1 − t)²) + its Taylor control C^0
        weighting=vd.flow_matching_weighting, control=vd.FlowTaylorControl(0),
        layout=CoefficientLayout("element", groups=bins),
    ).build(velocity, model.parameters(), alpha=lambda t: 1 - t)  # fmt: skip

    losses: list[float] = []
    diagnostics: dict[str, Any] = {}
    global_step = 0
    while global_step < args.max_train_steps:
        for (x,) in loader:
            noise = torch.randn(x.shape, generator=generator).to(x)
            t = torch.sigmoid(torch.randn(x.shape[0], generator=generator)).to(x)  # logit-normal
            t = t.clamp(1e-4, 1 - 1e-4)
            if args.varred:
                diagnostics = step(x, t, noise)  # varred
                loss = diagnostics["loss"]  # varred
            else:  # the plain lines, replaced by the two above
                xt = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise
                v = model(xt, 1000 * t).sample
                loss = F.mse_loss(v.float(), (noise - x).float(), reduction="none")
                loss = loss.flatten(1).sum(1).mean()
                accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            global_step += 1
            if global_step >= args.max_train_steps:
                break
    if not math.isfinite(losses[-1]):
        raise RuntimeError(f"training diverged: loss {losses[-1]}")
    return {"losses": losses, "model": unet, "diagnostics": diagnostics}


if __name__ == "__main__":
    main()
