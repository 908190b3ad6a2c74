"""Per-slice random number generation.

Every slice of a volume gets its own generator, seeded from the run seed and the
slice index.  A result therefore depends on the seed and the slice, never on the
batch size or on which other slices share the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch


def slice_seed(seed: int, index: int) -> int:
    """A 63-bit seed for slice ``index`` of a run seeded with ``seed`` (splitmix64 mix)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class BatchRNG:
    """One ``torch.Generator`` per batch item.

    ``randn((C, H, W))`` returns a ``(B, C, H, W)`` tensor whose item ``b`` is drawn
    from generator ``b`` only.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = []
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(s)
            self.generators.append(g)

    @classmethod
    def for_slices(cls, seed: int, indices: Sequence[int], device="cpu") -> "BatchRNG":
        return cls([slice_seed(seed, i) for i in indices], device)

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, items: Sequence[int]) -> "BatchRNG":
        """A view on some items (the generators are shared, not copied)."""
        out = object.__new__(BatchRNG)
        out.device = self.device
        out.seeds = [self.seeds[i] for i in items]
        out.generators = [self.generators[i] for i in items]
        return out

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def rand(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack(
            [torch.rand(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randint(self, low: int, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
        return torch.stack(
            [torch.randint(low, high, tuple(shape), generator=g, device=self.device) for g in self.generators]
        )

    def integers(self, high: int) -> list[int]:
        """One Python integer in [0, high) per item (e.g. a seed for a CPU noise generator)."""
        return [int(torch.randint(0, high, (1,), generator=g, device=self.device).item()) for g in self.generators]
