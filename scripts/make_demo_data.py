"""Builds data/mvtec_ad_demo/bottle, the small real demo category shipped in the repository.

From the full MVTec AD bottle category (CC BY-NC-SA 4.0, MVTec Software GmbH) it keeps every
third training image and every test image, resized from 900x900 to 256x256 with Pillow's
bilinear filter, exactly as the reference's first preprocessing step does. A model with the
default preprocessing (shorter side 256, centre crop 224) therefore sees bit-identical inputs
from the demo as from the full-resolution files. Masks are resized the same way and then keep
only the pixels that are 255 (the reference's rule), stored as 0/255, so they too give the same
ground truth as the originals.

    python scripts/make_demo_data.py ../shared/data/mvtec_ad/bottle data/mvtec_ad_demo/bottle
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
TRAIN_STEP = 3

README = """# MVTec AD bottle, demo subset

A subset of the bottle category of the MVTec Anomaly Detection dataset, shipped so that the
README's main job and the tests run on a fresh clone with no download:

- `train/good/`: every {step}rd of the 209 training images ({num_train} images);
- `test/`: all 83 test images (20 good, 63 defective), `ground_truth/`: their masks.

Changes from the original: images resized from 900x900 to {size}x{size} pixels with Pillow's
bilinear filter (the reference's own first preprocessing step, so with the default settings a
model sees exactly the same inputs as from the originals); masks resized the same way and
re-binarised to the pixels that are 255 after resizing (the reference's rule), stored as 0/255.
Built by `scripts/make_demo_data.py` from the original category.

Source: MVTec AD, https://www.mvtec.com/company/research/datasets/mvtec-ad
Paul Bergmann, Michael Fauser, David Sattlegger, Carsten Steger, "A Comprehensive Real-World
Dataset for Unsupervised Anomaly Detection", CVPR 2019.

Licence: Copyright 2019 MVTec Software GmbH, Creative Commons
Attribution-NonCommercial-ShareAlike 4.0 International (see `license.txt`); this adapted subset
is shared under the same licence. The patchcore-jax code is Apache-2.0; this folder is not.
"""


def _resize(path: Path, target: Path) -> None:
    image = Image.open(path)
    image.load()
    target.parent.mkdir(parents=True, exist_ok=True)
    if image.mode in ("L", "1") and "ground_truth" in path.parts:
        resized = np.asarray(image.convert("L").resize((SIZE, SIZE), Image.BILINEAR))
        Image.fromarray(np.where(resized == 255, 255, 0).astype(np.uint8)).save(target)
    else:
        image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the full MVTec AD bottle folder")
    parser.add_argument("out", type=Path, help="the demo folder to write (replaced)")
    args = parser.parse_args()
    train = sorted((args.source / "train/good").glob("*.png"))[::TRAIN_STEP]
    others = sorted((args.source / "test").rglob("*.png"))
    others += sorted((args.source / "ground_truth").rglob("*.png"))
    shutil.rmtree(args.out, ignore_errors=True)
    for path in [*train, *others]:
        _resize(path, args.out / path.relative_to(args.source))
    shutil.copy(args.source / "license.txt", args.out / "license.txt")
    (args.out / "README.md").write_text(
        README.format(step=TRAIN_STEP, num_train=len(train), size=SIZE), encoding="utf-8"
    )
    print(f"wrote {args.out}: {len(train)} train, {len(others)} test images and masks")


if __name__ == "__main__":
    main()
