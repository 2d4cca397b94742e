"""Minibatch optimal-transport coupling of data and noise for flow matching.

Tong et al. (2024), "Improving and generalizing flow-based generative models with
minibatch optimal transport" (OT-CFM); Pooladian et al. (2023), "Multisample flow matching".
Within a batch, re-pair the noise draws with the data points by the exact assignment
minimising ``Σ_i ‖x_i − ε_{π(i)}‖²`` (Hungarian / Jonker–Volgenant via
``scipy.optimize.linear_sum_assignment``, ``O(B³)`` on the host; scipy is optional).

**Bias.** Each paired ``ε_{π(i)}`` is still marginally ``N(0, I)`` and each ``x_i`` is still a
data point, but the pairs are no longer independent: the loss becomes the flow-matching
loss of the minibatch-OT coupling, a *different objective* whose minimiser is the
(straighter) marginal velocity field of that coupling, not the independent-coupling one;
as ``B → ∞`` it approaches the OT coupling (Tong et al., Prop. 3.4 for the exact-OT limit).
It also breaks the premise of every Taylor control (``E[C^k | x] = 0`` needs ``ε``
independent of ``x``): do not combine it with ``flow_matching_taylor_cv``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["MAX_OT_BATCH", "ot_pair_noise"]

#: Largest batch for the exact assignment (cost ``O(B³)`` per step on the CPU).
MAX_OT_BATCH = 256


def ot_pair_noise(x: Tensor, noise: Tensor, *, max_batch: int = MAX_OT_BATCH) -> Tensor:
    """The noise rows re-ordered ``[B, ...]`` so that ``Σ_i ‖x_i − ε_i‖²`` is minimal.

    Args:
        x: data ``[B, ...]``.
        noise: ``ε`` ``[B, ...]`` (drawn independently of ``x`` by the caller).
        max_batch: refuse batches above this size (the exact solver is ``O(B³)``).

    Returns:
        ``noise[π]`` ``[B, ...]``: a permutation of the rows (gathered, same values).

    Raises:
        VarRedError: shapes differ, or ``B > max_batch``.

    Example:
        >>> x = torch.tensor([[0.0], [10.0]])
        >>> ot_pair_noise(x, torch.tensor([[9.0], [1.0]]))
        tensor([[1.],
                [9.]])
    """
    check_floating("x", x)
    check_floating("noise", noise)
    if noise.shape != x.shape or x.ndim < 1:
        raise VarRedError(f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}")
    b = x.shape[0]
    if b > max_batch:
        raise VarRedError(
            f"x: expected a batch of at most max_batch={max_batch} for the exact assignment, got {b}"
        )
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # scipy is optional: only this function needs it
        raise ImportError("ot_pair_noise needs scipy (pip install scipy)") from err

    xf = x.detach().reshape(b, -1).to(torch.float64)  # [B, ...] -> [B, D]
    ef = noise.detach().reshape(b, -1).to(torch.float64)
    cost = torch.cdist(xf, ef).pow(2).cpu().numpy()  # [B, B]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(b, dtype=np.int64)
    perm[rows] = cols
    return noise[torch.as_tensor(perm, device=noise.device)]
