"""Folder readers: MVTec AD categories, the same layout for users' own data, and image folders.

Layout (MVTec AD is a special case)::

    <root>/train/good/*.png          nominal images for fit (or images directly in train/)
    <root>/test/good/*.png           nominal test images, label 0 ("good" in any case)
    <root>/test/<defect>/*.png       defective test images, label 1
    <root>/ground_truth/<defect>/<stem>_mask.png   their masks (255 = defect)

The same rules hold for every folder name (MVTec AD is not special-cased): every defect image
needs a mask unless ``allow_missing_masks`` (then it is left out of pixel metrics); a test folder
named like "good" but not "good" (e.g. "goods") gets a warning; folders without images are
ignored with a warning. Image files are those with extension png, jpg, jpeg, bmp, tif, tiff or
webp (any case); names starting with "." (files and folders, e.g. ``.ipynb_checkpoints``) are
ignored everywhere, and so are folders that patchcore-jax wrote (they hold ``OUTPUT_MARKER``).
Other files (a GIF, a text file) and broken links are skipped with one warning per folder that
names them. Every listing is sorted by name, so the order is
deterministic (for MVTec it is the reference's order). Only paths are collected here; decoding
happens in ``preprocess``.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore_jax import preprocess
from patchcore_jax.files import OUTPUT_MARKER, some_of

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"
MASK_SUFFIX = "_mask"
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


class DatasetWarning(UserWarning):
    """Something in a dataset folder was skipped or looks like a mistake."""


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
        return sorted({s.defect_type for s in self.test_samples if s.label == 1})

    @property
    def has_pixel_labels(self) -> np.ndarray:
        """[num_test] bool: False for defect images without a mask (left out of pixel metrics)."""
        return np.array(
            [s.label == 0 or s.mask_path is not None for s in self.test_samples], dtype=bool
        )


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (any case)."""
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def is_tool_output(folder: Path) -> bool:
    """True for a folder that patchcore-jax wrote its results into (never read as data)."""
    return (folder / OUTPUT_MARKER).exists()


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that may hold data: not hidden, not tool outputs; sorted."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not is_tool_output(p)
        ),
        key=lambda p: p.name,
    )


def _why_skipped(path: Path) -> str | None:
    """Why a visible entry of an image folder is not an image (None: an image or a folder)."""
    if path.is_symlink() and not path.exists():
        return "a broken link or a link loop"
    if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file ({', '.join(IMAGE_EXTENSIONS)})"
    return None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; the other visible files (other
    extensions, broken links) are skipped with one ``DatasetWarning`` naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images, skipped = [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_image_file(path):
            images.append(path)
        elif not path.name.startswith(".") and (reason := _why_skipped(path)):
            skipped.append(f"{path}: {reason}")
    if skipped:
        many = f"{len(skipped)} files in {folder}: " if len(skipped) > 1 else ""
        warnings.warn(f"skipping {many}{some_of(skipped, 2)}", DatasetWarning, stacklevel=2)
    return images


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
            found = sorted(_images_below(path)) if recursive else list_images(path)
            if not found:
                raise ValueError(
                    f"folder {path} contains no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif path.is_symlink():
            raise FileNotFoundError(f"image path {path} is a broken link or a link loop")
        else:
            raise FileNotFoundError(f"image path {path} does not exist")
    if not out:
        raise ValueError("no image paths given")
    return out


def output_names(entries: Sequence[str | os.PathLike], recursive: bool = False):
    """The images of files and folders, and a unique output name for each:
    ``(paths, names)``.

    A folder's images are named by their path relative to the folder, under the folder's own
    name (``good/000.png``); a file by its name. If two entries would give the same name, every
    name gets its entry's position as a prefix (``2/good/000.png``).
    """
    paths: list[Path] = []
    names: list[str] = []
    positions: list[int] = []
    for position, entry in enumerate(entries, start=1):
        entry_path = Path(entry)
        if entry_path.is_dir():
            found = image_paths([entry_path], recursive=recursive)
            base = Path(entry_path.absolute().name)
            names += [(base / path.relative_to(entry_path)).as_posix() for path in found]
        else:
            found = image_paths([entry_path])
            names.append(entry_path.name)
        paths += found
        positions += [position] * len(found)
    if len(set(names)) != len(names):
        names = [f"{position}/{name}" for position, name in zip(positions, names, strict=True)]
    return paths, names


def _images_below(folder: Path) -> list[Path]:
    """Image files in ``folder`` and its visible sub-folders (hidden and tool outputs skipped)."""
    found = list_images(folder)
    for sub_dir in _visible_dirs(folder):
        found += _images_below(sub_dir)
    return found


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


def load_train_paths(root: str | os.PathLike, *, role: str = "training") -> list[Path]:
    """The nominal training images of ``root``: ``train/good/``, images directly in ``train/``,
    or, for a plain folder of good images, the images directly in ``root``.

    Only the training images are looked at (``test/`` and ``ground_truth/`` may be absent).
    ``role`` names the folder's use in errors ("validation folder ... contains no images").
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not (root / "train").is_dir():
        loose = list_images(root)
        if loose:
            return loose
        raise FileNotFoundError(
            f"{role} folder {root} holds no images (expected {root}/train/good/*.png, "
            f"{root}/train/*.png or images in {root})"
        )
    return _train_paths(root, role)


def load_validation_folder(root: str | os.PathLike) -> Dataset:
    """A validation folder: with ``test/`` (MVTec layout) its labelled ``test_samples``, every
    defect image with its mask (a labelled threshold needs them); else its good images
    (``load_train_paths``) as ``train_paths``, with no test samples.

    Raises:
      FileNotFoundError / ValueError naming the validation folder or the files at fault.
    """
    root = Path(root)
    if not (root / "test").is_dir():
        return Dataset(root, tuple(load_train_paths(root, role="validation")), ())
    samples = _test_samples(root, allow_missing_masks=True)
    unmasked = [s.image_path for s in samples if s.label and s.mask_path is None]
    if unmasked:
        raise ValueError(
            f"{len(unmasked)} defective validation images have no mask ({some_of(unmasked)}); "
            f"a labelled validation folder needs {root}/ground_truth/<type>/<stem>{MASK_SUFFIX}"
            ".png for every defective image"
        )
    return Dataset(root, (), tuple(samples))


def same_files(
    first: Sequence[str | os.PathLike], second: Sequence[str | os.PathLike]
) -> list[Path]:
    """The paths of ``second`` naming a file that ``first`` names too, compared by resolved
    path (links, ``..`` and relative paths see through), in the order of ``second``."""
    known = {Path(path).resolve() for path in first}
    return [Path(path) for path in second if Path(path).resolve() in known]


def few_shot_subset(
    train_paths: Sequence[str | os.PathLike], num_images: int, seed: int = 0
) -> list[Path]:
    """The few-shot protocol's training subset: ``num_images`` of ``train_paths``.

    The paths are sorted by name, then ``numpy.random.default_rng(seed).choice`` draws
    ``num_images`` distinct positions; the subset comes back in sorted order. It depends only on
    the file names, ``num_images`` and ``seed`` (not on the backbone or anything else), so every
    backbone, ensemble member and rerun sees the same images.

    Raises:
      ValueError: ``num_images`` < 1 or more than there are training images.
    """
    paths = sorted((Path(p) for p in train_paths), key=lambda p: p.name)
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"the number of training images must be >= 1, got {num_images!r}")
    if num_images > len(paths):
        where = f" in {paths[0].parent}" if paths else ""
        raise ValueError(
            f"{num_images} training images requested (--train-images), but only {len(paths)} "
            f"exist{where}"
        )
    chosen = np.random.default_rng(seed).choice(len(paths), size=num_images, replace=False)
    return [paths[i] for i in sorted(chosen.tolist())]


def check_validation_apart(
    train_paths: Sequence[str | os.PathLike], validation_paths: Sequence[str | os.PathLike]
) -> None:
    """Refuses validation images that are training images too (``same_files``): they score
    low on a bank built from themselves, so a threshold calibrated on them would sit below the
    scores of unseen good images. ValueError naming the first few and the count."""
    shared = same_files(train_paths, validation_paths)
    if shared:
        raise ValueError(
            f"{len(shared)} of {len(validation_paths)} validation images are training images "
            f"too: {some_of(shared)}; calibrate on images the model was not fitted on"
        )


def load_dataset(
    root: str | os.PathLike, *, allow_missing_masks: bool = False, train: bool = True
) -> Dataset:
    """Reads a category folder (layout in the module docstring) into a ``Dataset``.

    Args:
      root: the category folder.
      allow_missing_masks: accept defect images without a mask (they are then left out of
        pixel metrics, see ``Dataset.has_pixel_labels``); by default each one is an error.
      train: read ``train/`` too; False reads only the test side (``train_paths`` empty).
    Raises:
      FileNotFoundError / ValueError naming the offending path: missing root, train or test
      folder; no images; a mask without its image; ambiguous or missing masks.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return Dataset(
        root=root,
        train_paths=tuple(_train_paths(root)) if train else (),
        test_samples=tuple(_test_samples(root, allow_missing_masks)),
    )


def validate_masks(dataset: Dataset) -> None:
    """Checks every mask is readable and has its image's size (headers only, no decoding).

    Raises:
      ValueError / ImageLoadError naming the mask and its image.
    """
    for sample in dataset.test_samples:
        if sample.mask_path is not None:
            preprocess.check_mask_size(sample.image_path, sample.mask_path)


def _train_paths(root: Path, role: str = "training") -> list[Path]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{role} folder {train_dir} does not exist")
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
            raise ValueError(f"{role} folder {good_dir} contains no image files")
        return paths
    if not loose:
        raise ValueError(
            f"{role} folder {train_dir} contains no image files (expected {good_dir}/*.png "
            f"or images directly in {train_dir})"
        )
    return loose


def _is_good(name: str) -> bool:
    return name.lower() == GOOD


def _test_samples(root: Path, allow_missing_masks: bool) -> list[Sample]:
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
    type_dirs = []
    for type_dir in _visible_dirs(test_dir):
        if not list_images(type_dir):
            warnings.warn(
                f"ignoring {type_dir}: it holds no image files", DatasetWarning, stacklevel=3
            )
            continue
        name = type_dir.name
        if not _is_good(name) and difflib.get_close_matches(name.lower(), [GOOD], cutoff=0.7):
            warnings.warn(
                f"test folder {type_dir} is read as the defect type {name!r} (label 1); only "
                f"'{GOOD}' (any case) holds defect-free images",
                DatasetWarning,
                stacklevel=3,
            )
        type_dirs.append(type_dir)
    good_dirs = [p for p in type_dirs if _is_good(p.name)]
    if len(good_dirs) > 1:
        raise ValueError(f"{test_dir} has several good-image folders: {good_dirs}")
    if gt_dir.is_dir():
        for mask_type_dir in _visible_dirs(gt_dir):
            if not (test_dir / mask_type_dir.name).is_dir() and list_images(mask_type_dir):
                missing = test_dir / mask_type_dir.name
                raise ValueError(f"mask folder {mask_type_dir} has no test folder {missing}")
    samples: list[Sample] = []
    missing_masks: list[Path] = []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        label = 0 if _is_good(defect_type) else 1
        images = list_images(type_dir)
        mask_dir = gt_dir / defect_type
        masks = _masks_by_stem(mask_dir) if mask_dir.is_dir() else {}
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
            if mask_path is None and label == 1:
                missing_masks.append(mask_dir / f"{image_path.stem}{MASK_SUFFIX}.png")
            samples.append(Sample(image_path, label, defect_type, mask_path))
    if missing_masks and not allow_missing_masks:
        raise ValueError(
            f"{len(missing_masks)} defective test images have no mask (e.g. {missing_masks[0]}); "
            "add the masks, or allow this (CLI --allow-missing-masks, library "
            "allow_missing_masks=True) to leave those images out of the pixel metrics"
        )
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
