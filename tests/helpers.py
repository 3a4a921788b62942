"""Small synthetic pair datasets for tests that must not depend on the phantom generator."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ShiftedBlobs(Dataset):
    """Pairs of a smooth blob image and the same image shifted by a few voxels (2D or 3D).

    ``moving`` is ``fixed`` translated by an integer shift, so a translation registers it exactly.
    """

    labels = "acdc"

    def __init__(self, n: int = 8, size: tuple[int, ...] = (32, 32), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
        for i in range(n):
            centre = [s / 2 + float(torch.randint(-3, 4, (1,), generator=g)) for s in size]
            r2 = sum((x - c) ** 2 for x, c in zip(grids, centre))
            fixed = torch.exp(-r2 / (2 * (size[-1] / 6) ** 2))
            shift = [int(torch.randint(-2, 3, (1,), generator=g)) for _ in size]
            moving = torch.roll(fixed, shifts=shift, dims=tuple(range(len(size))))
            fl = (fixed > 0.5).long() * 3 + ((fixed > 0.2) & (fixed <= 0.5)).long() * 2
            ml = torch.roll(fl, shifts=shift, dims=tuple(range(len(size))))
            self.items.append({
                "moving": moving[None] * 2 - 1, "fixed": fixed[None] * 2 - 1,
                "moving_label": ml[None], "fixed_label": fl[None], "case": f"blob{i:02d}",
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
