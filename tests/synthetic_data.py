"""A small Magnetic-Tile-like dataset made on the fly: non-square tiles, anti-aliased masks.

Layout as the Magnetic Tile Defects set ships it (no train/test split)::

    <root>/MT_Free/Imgs/<name>.jpg      defect-free tiles, each with an all-zero <name>.png mask
    <root>/MT_Blowhole/Imgs/<name>.jpg  tiles with a dark hole, <name>.png anti-aliased masks
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TILE_SIZE = (283, 105)  # (width, height), as the paper's dataset's narrow tiles


def _tile(rng: np.random.Generator) -> np.ndarray:
    """A grey, gently textured tile [height, width, 3] uint8."""
    width, height = TILE_SIZE
    base = rng.normal(128, 6, (height // 5 + 1, width // 5 + 1))
    texture = np.asarray(Image.fromarray(base.astype(np.float32)).resize((width, height)))
    noise = rng.normal(0, 3, (height, width))
    gray = np.clip(texture + noise, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_magnetic_tiles(root: Path, num_good: int = 10, num_defect: int = 4, seed: int = 0) -> Path:
    """Writes the dataset under ``root`` and returns ``root``."""
    rng = np.random.default_rng(seed)
    free = root / "MT_Free" / "Imgs"
    holes = root / "MT_Blowhole" / "Imgs"
    free.mkdir(parents=True)
    holes.mkdir(parents=True)
    width, height = TILE_SIZE
    for index in range(num_good):
        name = f"exp{index}_num_{index:04d}"
        Image.fromarray(_tile(rng)).save(free / f"{name}.jpg", quality=95)
        Image.fromarray(np.zeros((height, width), np.uint8)).save(free / f"{name}.png")
    for index in range(num_defect):
        name = f"exp{index}_num_{100 + index:04d}"
        tile = _tile(rng)
        # a dark hole near one end, where a centre crop of the tile would not see it
        center_x = int(rng.choice([30, width - 30]))
        center_y = int(rng.integers(35, height - 35))
        radius = int(rng.integers(12, 18))
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).ellipse(
            (center_x - radius, center_y - radius, center_x + radius, center_y + radius), fill=255
        )
        soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.5)))  # anti-aliased edges
        darkness = soft.astype(np.float32)[:, :, None] / 255.0
        tile = (tile * (1.0 - 0.8 * darkness)).astype(np.uint8)
        Image.fromarray(tile).save(holes / f"{name}.jpg", quality=95)
        Image.fromarray(soft).save(holes / f"{name}.png")
    return root
