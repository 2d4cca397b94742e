"""diffusers' ``train_unconditional.py`` loop with varred's control variate on the gradient.

The loop is the one diffusers users write (``DDPMScheduler``, integer timesteps,
``scheduler.add_noise``, ``UNet2DModel(...).sample``, MSE, ``accelerate.Accelerator``); the
lines marked ``# varred`` are all that varred adds (docs/diffusers.md counts them). With
``--no-varred`` the step is diffusers' own, unchanged. The varred step computes the same loss
(``DiffusersAdapter.mse_weighting``: per-sample MSE for ε, the SNR-weighted x0-MSE of
``train_unconditional.py`` for sample, v-MSE for v) and fills ``p.grad`` with the gradient
minus β ⊙ the gradient of the zero-mean control ``C^0`` (Jeha et al., 2024), β per element and
per timestep quantile bin.

    python examples/train_diffusers.py --prediction_type epsilon --max_train_steps 200
    python examples/train_diffusers.py --synthetic 64 --resolution 8 --block_out_channels 8 16 \\
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
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, TensorDataset

from varred_diffusion import ControlledDSM  # varred
from varred_diffusion.adapters import DiffusersAdapter  # varred
from varred_diffusion.bins import QuantileBins  # varred


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="IDX directory (default: Fashion-MNIST)")
    p.add_argument("--synthetic", type=int, default=0, help="N random images instead of data")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--norm_num_groups", type=int, default=8)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--max_train_steps", type=int, default=200)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=10)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--ddpm_num_steps", type=int, default=1000)
    p.add_argument("--ddpm_beta_schedule", default="linear")
    p.add_argument(
        "--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"]
    )
    p.add_argument("--no-varred", dest="varred", action="store_false", help="diffusers' own step")
    p.add_argument("--num_bins", type=int, default=4, help="timestep-quantile bins for β")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force the CPU (accelerate)")
    return p.parse_args(argv)


def load_dataset(args: argparse.Namespace, generator: torch.Generator) -> TensorDataset:
    """Images ``[N, 1, R, R]`` in ``[-1, 1]``: an IDX split padded/resized to R, or noise."""
    r = args.resolution
    if args.synthetic:
        x = torch.rand(args.synthetic, 1, r, r, generator=generator) * 2 - 1
        return TensorDataset(x)
    from varred_diffusion.experiments.data import load_images

    x = load_images(args.data_dir or "/usr/share/datasets/fashion-mnist", split="train")
    x = F.pad(x, [2] * 4, value=-1.0) if r == 32 else F.interpolate(x, size=(r, r))
    return TensorDataset(x)


def diffusers_loss(model_output, clean_images, noise, timesteps, noise_scheduler, prediction_type):  # type: ignore[no-untyped-def]
    """The loss of diffusers' training scripts (train_unconditional.py; v: train_text_to_image)."""
    if prediction_type == "epsilon":
        return F.mse_loss(model_output.float(), noise.float())
    if prediction_type == "sample":  # train_unconditional.py: SNR-weighted x0-MSE
        alpha_t = noise_scheduler.alphas_cumprod.to(clean_images.device)[timesteps]
        snr_weights = (alpha_t / (1 - alpha_t))[:, None, None, None]
        mse = F.mse_loss(model_output.float(), clean_images.float(), reduction="none")
        return (snr_weights * mse).mean()
    target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    return F.mse_loss(model_output.float(), target.float())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    generator = torch.Generator().manual_seed(args.seed)  # the loop's randomness, explicit
    n = len(args.block_out_channels)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(args.seed)
        model = UNet2DModel(
            sample_size=args.resolution,
            in_channels=1,
            out_channels=1,
            layers_per_block=args.layers_per_block,
            block_out_channels=tuple(args.block_out_channels),
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            norm_num_groups=args.norm_num_groups,
        )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    dataset = load_dataset(args, generator)
    train_dataloader = DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, generator=generator
    )
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    score = DiffusersAdapter(  # varred: the UNet as a score function (one statement)
        accelerator.unwrap_model(model), noise_scheduler.alphas_cumprod, args.prediction_type
    )
    step = ControlledDSM(  # varred: loss + C^0 control, β per element and bin (one statement)
        score,
        model.parameters(),
        order=0,
        alpha=score.alpha,
        weighting=score.mse_weighting(args.resolution**2),  # = diffusers' MSE (C·H·W = R²)
        bins=QuantileBins.from_timesteps(noise_scheduler.alphas_cumprod, args.num_bins),
        control_kwargs={
            "shrinkage": 100.0,
            "process_group": "default" if accelerator.num_processes > 1 else None,
        },
    )

    losses: list[float] = []
    diagnostics: dict[str, Any] = {}
    global_step = 0
    while global_step < args.max_train_steps:
        model.train()
        for (clean_images,) in train_dataloader:
            noise = torch.randn(clean_images.shape, generator=generator).to(clean_images)
            bsz = clean_images.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator
            ).to(clean_images.device)
            with accelerator.accumulate(model):
                if args.varred:
                    diagnostics = step(clean_images, score.sigma(timesteps), noise)  # varred
                    loss = diagnostics["loss"]  # varred
                else:  # diffusers' own lines, replaced by the two above
                    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
                    model_output = model(noisy_images, timesteps).sample
                    loss = diffusers_loss(
                        model_output,
                        clean_images,
                        noise,
                        timesteps,
                        noise_scheduler,
                        args.prediction_type,
                    )
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(float(loss.detach()))
            global_step += 1
            if global_step % 50 == 0 or global_step == args.max_train_steps:
                extra = {k: float(v) for k, v in diagnostics.items() if k == "variance_ratio"}
                accelerator.print(f"step {global_step}: loss {losses[-1]:.4f} {extra}")
            if global_step >= args.max_train_steps:
                break
    if not math.isfinite(losses[-1]):
        raise RuntimeError(f"training diverged: loss {losses[-1]}")
    return {"losses": losses, "model": accelerator.unwrap_model(model), "diagnostics": diagnostics}


if __name__ == "__main__":
    main()
