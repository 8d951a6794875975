"""Dataset readers: MVTec AD categories and the same folder layout for users' own data.

Layout (MVTec AD is a special case)::

    <root>/train/good/*.png          nominal images for fit (or images directly in train/)
    <root>/test/good/*.png           nominal test images, label 0
    <root>/test/<defect>/*.png       defective test images, label 1
    <root>/ground_truth/<defect>/<stem>_mask.png   optional masks (255 = defect)

Image files are those with extension png, jpg, jpeg, bmp, tif or tiff (any case); names starting
with "." are ignored. Every listing is sorted by name, so the order is deterministic (for MVTec
it is the reference's order). Only paths are collected here; decoding happens in ``preprocess``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore_jax import preprocess

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
MASK_SUFFIX = "_mask"
# In MVTec AD every defective test image has a mask; a missing one means a broken copy.
MVTEC_AD_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 0 (good) or 1 (defect); ``mask_path`` None means all normal."""

    image_path: Path
    label: int
    defect_type: str
    mask_path: Path | None


@dataclass(frozen=True)
class Dataset:
    """Nominal training images and labelled test samples of one category, in sorted order."""

    root: Path
    train_paths: tuple[Path, ...]
    test_samples: tuple[Sample, ...]

    @property
    def test_image_paths(self) -> list[Path]:
        return [sample.image_path for sample in self.test_samples]

    @property
    def test_mask_paths(self) -> list[Path | None]:
        return [sample.mask_path for sample in self.test_samples]

    @property
    def test_labels(self) -> np.ndarray:
        """[num_test] int64, 1 for defective images."""
        return np.array([sample.label for sample in self.test_samples], dtype=np.int64)

    @property
    def defect_types(self) -> list[str]:
        """Sorted names of the test folders other than ``good``."""
        return sorted({s.defect_type for s in self.test_samples if s.defect_type != GOOD})


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (any case)."""
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def image_paths(paths_or_dirs: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expands folders into their sorted image files; files are kept as given, in order.

    With ``recursive``, sub-folders are searched too (sorted by relative path).
    """
    if isinstance(paths_or_dirs, str | os.PathLike):
        paths_or_dirs = [paths_or_dirs]
    out: list[Path] = []
    for entry in paths_or_dirs:
        path = Path(entry)
        if path.is_dir():
            if recursive:
                found = sorted(p for p in path.rglob("*") if is_image_file(p))
            else:
                found = list_images(path)
            if not found:
                raise ValueError(
                    f"folder {path} contains no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"image path {path} does not exist")
    if not out:
        raise ValueError("no image paths given")
    return out


def find_mask(image_path: str | os.PathLike) -> Path | None:
    """The mask of ``<root>/test/<defect>/<stem>.<ext>``, if it exists, else None.

    Looks for ``<root>/ground_truth/<defect>/<stem>_mask.<image extension>``; more than one
    candidate is an error naming them.
    """
    image_path = Path(image_path)
    mask_dir = image_path.parent.parent.parent / "ground_truth" / image_path.parent.name
    if image_path.parent.parent.name != "test" or not mask_dir.is_dir():
        return None
    return _masks_by_stem(mask_dir).get(image_path.stem)


def load_dataset(root: str | os.PathLike, *, require_masks: bool | None = None) -> Dataset:
    """Reads a category folder (layout in the module docstring) into a ``Dataset``.

    Args:
      root: the category folder.
      require_masks: every defective test image must have a mask. Default: True when the
        folder is named like an MVTec AD category (where every defect image has one).
    Raises:
      FileNotFoundError / ValueError naming the offending path: missing root, train or test
      folder; no images; a mask without its image; ambiguous or missing masks.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if require_masks is None:
        require_masks = root.name in MVTEC_AD_CATEGORIES
    return Dataset(
        root=root,
        train_paths=tuple(_train_paths(root)),
        test_samples=tuple(_test_samples(root, require_masks)),
    )


def validate_masks(dataset: Dataset) -> None:
    """Checks every mask is readable and has its image's size (headers only, no decoding).

    Raises:
      ValueError / ImageLoadError naming the mask and its image.
    """
    for sample in dataset.test_samples:
        if sample.mask_path is not None:
            preprocess.check_mask_size(sample.image_path, sample.mask_path)


def _train_paths(root: Path) -> list[Path]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"training folder {train_dir} does not exist")
    good_dir = train_dir / GOOD
    loose = list_images(train_dir)
    if good_dir.is_dir():
        if loose:
            raise ValueError(
                f"{train_dir} has both a {GOOD}/ folder and loose images (e.g. {loose[0].name}); "
                f"put all training images in {good_dir}"
            )
        paths = list_images(good_dir)
        if not paths:
            raise ValueError(f"training folder {good_dir} contains no image files")
        return paths
    if not loose:
        raise ValueError(
            f"training folder {train_dir} contains no image files (expected {good_dir}/*.png "
            f"or images directly in {train_dir})"
        )
    return loose


def _test_samples(root: Path, require_masks: bool) -> list[Sample]:
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"test folder {test_dir} does not exist")
    loose = list_images(test_dir)
    if loose:
        raise ValueError(
            f"test images must be in {test_dir}/{GOOD}/ or {test_dir}/<defect type>/, "
            f"found {loose[0]} directly in {test_dir}"
        )
    gt_dir = root / "ground_truth"
    type_dirs = sorted(
        (p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if gt_dir.is_dir():
        for mask_type_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            if not (test_dir / mask_type_dir.name).is_dir() and list_images(mask_type_dir):
                missing = test_dir / mask_type_dir.name
                raise ValueError(f"mask folder {mask_type_dir} has no test folder {missing}")
    samples: list[Sample] = []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        label = 0 if defect_type == GOOD else 1
        images = list_images(type_dir)
        masks = _masks_by_stem(gt_dir / defect_type) if (gt_dir / defect_type).is_dir() else {}
        stems = {p.stem for p in images}
        if masks and len(stems) != len(images):
            raise ValueError(
                f"{type_dir} has several images with the same name stem, so masks "
                f"<stem>{MASK_SUFFIX}.<ext> cannot be matched to them"
            )
        for stem, mask_path in masks.items():
            if stem not in stems:
                raise ValueError(
                    f"mask {mask_path} has no image {type_dir}/{stem}.<ext>; masks are named "
                    f"<image stem>{MASK_SUFFIX}.<ext>"
                )
        for image_path in images:
            mask_path = masks.get(image_path.stem)
            if mask_path is None and label == 1 and require_masks:
                raise ValueError(
                    f"defective test image {image_path} has no mask "
                    f"{gt_dir / defect_type / (image_path.stem + MASK_SUFFIX)}.png; every defect "
                    "image of an MVTec AD category has one (pass require_masks=False to allow)"
                )
            samples.append(Sample(image_path, label, defect_type, mask_path))
    if not samples:
        raise ValueError(
            f"test folder {test_dir} contains no images in {GOOD}/ or <defect type>/ folders"
        )
    return samples


def _masks_by_stem(mask_dir: Path) -> dict[str, Path]:
    """{image stem: mask path} of the image files in ``mask_dir``; names must end in _mask."""
    masks: dict[str, Path] = {}
    for mask_path in list_images(mask_dir):
        if not mask_path.stem.endswith(MASK_SUFFIX):
            raise ValueError(f"mask file {mask_path} is not named <image stem>{MASK_SUFFIX}.<ext>")
        stem = mask_path.stem[: -len(MASK_SUFFIX)]
        if stem in masks:
            raise ValueError(f"image {stem} has two masks: {masks[stem]} and {mask_path}")
        masks[stem] = mask_path
    return masks
