"""Reference sources for the Stable Target Field: fresh draws per step, or a memory bank.

Xu, Tong & Jaakkola (2023) draw a large reference batch each step (CIFAR-10: 1024 images,
of which the minibatch is a part). :class:`FreshReference` does that through a user's
``draw(n, generator)``; :class:`MemoryBank` reuses the recent minibatches instead (no extra
data loading: a FIFO ring buffer of the last ``size`` images, one ring per class when
labels are given), at the price of references that are correlated with the step's batch
(see the bias note of :func:`varred_diffusion.stf.stf_target`).
Both follow :class:`varred_diffusion.stf.ReferenceSource`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["FreshReference", "MemoryBank"]


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise VarRedError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


class FreshReference:
    """A fresh reference batch of ``size`` points each step: ``draw(size, generator)``.

    Args:
        draw: ``draw(n, generator) -> [n, ...]`` or ``([n, ...], labels [n])``, i.i.d. from
            the training distribution (e.g. random indices into the data set).
        size: references per step (R).
        generator: passed to ``draw`` (the caller owns the randomness).

    Example:
        >>> data = torch.randn(100, 2)
        >>> src = FreshReference(lambda n, g: data[torch.randint(100, (n,), generator=g)], 16)
        >>> src.reference(data[:4], None)[0].shape
        torch.Size([16, 2])
    """

    def __init__(
        self,
        draw: Callable[[int, torch.Generator | None], Any],
        size: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(draw):
            raise VarRedError(
                f"draw: expected a callable draw(n, generator), got {type(draw).__name__}"
            )
        self.draw = draw
        self.size = _positive_int("size", size)
        self.generator = generator

    def reference(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(references [size, ...], labels [size] or None)`` from one call of ``draw``."""
        out = self.draw(self.size, self.generator)
        ref, ref_labels = out if isinstance(out, tuple) else (out, None)
        check_floating("draw", ref)
        if ref.shape[0] != self.size or ref.shape[1:] != x.shape[1:]:
            raise VarRedError(
                f"draw: expected [{self.size}, {', '.join(map(str, x.shape[1:]))}] "
                f"(size, data shape), got {shape_str(ref)}"
            )
        if ref_labels is not None and ref_labels.shape != (self.size,):
            raise VarRedError(
                f"draw: expected labels of shape [{self.size}], got {shape_str(ref_labels)}"
            )
        return ref, ref_labels

    def update(self, x: Tensor, labels: Tensor | None) -> None:
        """Nothing to remember."""


class MemoryBank:
    """FIFO ring buffer of the most recent ``size`` data points (per class with ``num_classes``).

    ``update(x, labels)`` writes the batch (the oldest entries are overwritten);
    ``reference`` returns everything stored, oldest first within each class ring. Storage is
    allocated at the first update with the batch's data shape, dtype and device.

    Args:
        size: capacity (per class when ``num_classes`` is given).
        num_classes: one ring per class; ``update`` then needs integer labels in
            ``[0, num_classes)``.

    Example:
        >>> bank = MemoryBank(3)
        >>> bank.update(torch.arange(4.0)[:, None], None)
        >>> bank.reference(torch.zeros(1, 1), None)[0].flatten().tolist()
        [1.0, 2.0, 3.0]
    """

    def __init__(self, size: int, *, num_classes: int | None = None) -> None:
        self.size = _positive_int("size", size)
        self.num_classes = (
            None if num_classes is None else _positive_int("num_classes", num_classes)
        )
        rings = 1 if self.num_classes is None else self.num_classes
        self._buffer: Tensor | None = None  # [rings, size, ...]
        self._count = [0] * rings  # entries stored per ring
        self._next = [0] * rings  # write position per ring

    def __len__(self) -> int:
        return sum(self._count)

    def update(self, x: Tensor, labels: Tensor | None) -> None:
        """Append the batch ``x`` ``[B, ...]`` (with ``labels`` ``[B]`` when per class)."""
        check_floating("x", x)
        x = x.detach()
        if self._buffer is None:
            self._buffer = x.new_zeros(len(self._count), self.size, *x.shape[1:])
        elif x.shape[1:] != self._buffer.shape[2:]:
            raise VarRedError(
                f"x: expected data shape {list(self._buffer.shape[2:])} (the bank's), got {shape_str(x)}"
            )
        if self.num_classes is None:
            self._write(0, x)
            return
        if labels is None or labels.shape != (x.shape[0],) or labels.is_floating_point():
            raise VarRedError(
                f"labels: expected integer labels of shape [{x.shape[0]}] for a per-class bank, "
                f"got {shape_str(labels)}"
            )
        lab = labels.to(x.device)
        if x.shape[0] and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
            raise VarRedError(
                f"labels: expected values in [0, {self.num_classes}), got range "
                f"[{int(lab.min())}, {int(lab.max())}]"
            )
        for c in torch.unique(lab).tolist():
            self._write(int(c), x[lab == c])

    def _write(self, ring: int, x: Tensor) -> None:
        assert self._buffer is not None
        x = x[-self.size :]  # only the newest `size` can survive
        n = x.shape[0]
        pos = (self._next[ring] + torch.arange(n, device=x.device)) % self.size
        self._buffer[ring, pos] = x.to(self._buffer.dtype)
        self._next[ring] = (self._next[ring] + n) % self.size
        self._count[ring] = min(self.size, self._count[ring] + n)

    def reference(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(stored points [n, ...], their labels [n] or None)``; ``n = 0`` before any update."""
        if self._buffer is None or len(self) == 0:
            empty = x[:0].detach()
            lab = (
                None
                if self.num_classes is None
                else torch.zeros(0, dtype=torch.long, device=x.device)
            )
            return empty, lab
        parts, labs = [], []
        for ring, count in enumerate(self._count):
            if count == 0:
                continue
            if count < self.size:
                parts.append(self._buffer[ring, :count])
            else:  # oldest first: from the write position around
                start = self._next[ring]
                parts.append(torch.roll(self._buffer[ring], -start, dims=0))
            labs.append(torch.full((count,), ring, dtype=torch.long, device=self._buffer.device))
        refs = torch.cat(parts, dim=0)
        return refs, (None if self.num_classes is None else torch.cat(labs))

    def state_dict(self) -> dict[str, Any]:
        """Buffer, counts and write positions (for checkpoints)."""
        return {
            "buffer": self._buffer,
            "count": torch.tensor(self._count, dtype=torch.long),
            "next": torch.tensor(self._next, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the ring count and capacity must match."""
        count = [int(c) for c in state["count"]]
        buf = state["buffer"]
        if len(count) != len(self._count) or (buf is not None and buf.shape[1] != self.size):
            raise VarRedError(
                f"state: expected {len(self._count)} rings of size {self.size}, got counts "
                f"{count} and buffer {shape_str(buf)}"
            )
        self._buffer = None if buf is None else buf.clone()
        self._count = count
        self._next = [int(c) for c in state["next"]]
