"""Build the MVTec AD layout from datasets that ship without a train/test split.

Many real inspection datasets (e.g. the Magnetic Tile Defects set: ``MT_Free/Imgs/*.jpg`` and
``MT_<defect>/Imgs/<name>.jpg`` with ``<name>.png`` masks beside them) come as folders of
defect-free images plus folders of defect images with masks. ``split_dataset`` turns them into::

    ROOT/train/good/            a seeded ``train_fraction`` of the good images
    ROOT/test/good/             the other good images
    ROOT/test/<defect>/         every defect image
    ROOT/ground_truth/<defect>/<stem>_mask.<ext>

by symbolic links (or copies). The sources are only read. ROOT is assembled in a hidden sibling
folder and renamed into place at the end, so a failed run leaves nothing half-written.

Masks of a defect image ``<stem>.<ext>`` are found beside it, or in the type's mask folder, as
``<stem>_mask.*`` (MVTec's naming) or as ``<stem>.png`` next to a non-PNG image (the Magnetic
Tile convention); in a mask folder also as ``<stem>.*``. A good image has no mask: in a good
folder every image file is a good image, except ``<stem>_mask.*`` beside its image and an
all-zero ``<stem>.png`` beside a non-PNG image (an empty mask, as Magnetic Tile ships them);
other files sharing a stem are all used, with a warning. No file may serve twice (a good image
that is also a defect image or a mask, e.g. ``--good D --defect D``): that is an error naming it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from patchcore_jax import preprocess
from patchcore_jax.config import SEED_LIMIT
from patchcore_jax.datasets.folders import GOOD, MASK_SUFFIX, DatasetWarning, list_images
from patchcore_jax.files import some_of, writing

# Folder names that say nothing about the defect type ("MT_Blowhole/Imgs" is "MT_Blowhole").
_GENERIC_FOLDER_NAMES = frozenset({"imgs", "images", "image", "img"})


def default_defect_name(folder: str | os.PathLike) -> str:
    """The defect type a folder stands for: its name, or its parent's if that name is generic."""
    folder = Path(folder).absolute()
    return folder.parent.name if folder.name.lower() in _GENERIC_FOLDER_NAMES else folder.name


def named_folders(specs: Sequence[str], option: str) -> dict[str, Path]:
    """``[NAME=]DIR`` strings as {defect type: folder}; NAME defaults to
    ``default_defect_name(DIR)``. ``option`` names the strings' source in errors.

    Raises:
      ValueError: a folder that does not exist, or a defect type given twice.
    """
    named: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        if not Path(folder).is_dir():
            raise ValueError(f"{option} {spec!r}: folder {folder!r} does not exist")
        name = name or default_defect_name(folder)
        if name in named:
            raise ValueError(f"{option}: defect type {name!r} given twice")
        named[name] = Path(folder)
    return named


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    """{name stem: the image files of ``folder`` with that stem}, sorted by name."""
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(folder):
        by_stem.setdefault(path.stem, []).append(path)
    return by_stem


def _is_empty_mask(path: Path) -> bool:
    """True for a readable image file that is zero everywhere (in every channel)."""
    try:
        return not preprocess.decode_mask(path).any()
    except preprocess.ImageLoadError:
        return False


def _good_folder_images(folder: Path) -> list[Path]:
    """The good images of ``folder``: every image file but ``<stem>_mask.*`` beside its image
    and an all-zero ``<stem>.png`` beside a non-PNG ``<stem>.*`` (a good image's empty mask);
    other files sharing a stem are all images, named in a ``DatasetWarning``."""
    by_stem = _by_stem(folder)
    images, shared = [], []
    for stem, paths in by_stem.items():
        if stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in by_stem:
            continue  # an MVTec-style mask beside its image
        pngs = [p for p in paths if p.suffix.lower() == ".png"]
        if len(paths) == 2 and len(pngs) == 1 and _is_empty_mask(pngs[0]):
            images += [p for p in paths if p is not pngs[0]]
            continue  # the Magnetic Tile convention: an empty mask beside each good image
        images += paths
        if len(paths) > 1:
            shared.append(" and ".join(p.name for p in paths))
    if shared:
        warnings.warn(
            f"good folder {folder}: files share a name stem ({some_of(shared)}); each is used "
            "as a good image (a good image has no mask; only an all-zero <stem>.png beside a "
            "non-PNG image is left out as its empty mask)",
            DatasetWarning,
            stacklevel=3,
        )
    return sorted(images, key=lambda p: p.name)


def _images_and_masks(folder: Path, mask_dir: Path | None) -> tuple[list[Path], dict[str, Path]]:
    """Defect images of ``folder`` (masks beside them excluded) and {image stem: mask path}."""
    by_stem = _by_stem(folder)
    images, masks = [], {}
    for stem, paths in by_stem.items():
        if stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in by_stem:
            continue  # an MVTec-style mask beside its image
        if len(paths) == 2 and sum(p.suffix.lower() == ".png" for p in paths) == 1:
            mask = next(p for p in paths if p.suffix.lower() == ".png")
            image = next(p for p in paths if p.suffix.lower() != ".png")
            images.append(image)
            masks[stem] = mask
            continue
        if len(paths) > 1:
            raise ValueError(
                f"{folder}: files {', '.join(p.name for p in paths)} share the name {stem!r}; "
                "cannot tell the image from its mask (a mask must be <stem>_mask.<ext>, or "
                "<stem>.png beside a non-PNG image)"
            )
        images.append(paths[0])
        if by_stem.get(stem + MASK_SUFFIX):
            masks[stem] = by_stem[stem + MASK_SUFFIX][0]
    if mask_dir is not None:
        candidates = {}
        for path in list_images(mask_dir):
            stem = path.stem[: -len(MASK_SUFFIX)] if path.stem.endswith(MASK_SUFFIX) else path.stem
            if stem in candidates:
                raise ValueError(f"{mask_dir}: two masks for {stem!r}: {candidates[stem]}, {path}")
            candidates[stem] = path
        masks = {image.stem: candidates[image.stem] for image in images if image.stem in candidates}
    return images, masks


def _check_arguments(
    defect_dirs: Mapping[str, str | os.PathLike],
    mask_dirs: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    train_fraction: float,
    seed: int,
) -> Path:
    """Checks the arguments themselves, before any source folder is read; returns ``out`` as
    an absolute path, which must not exist or be an empty folder."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    unknown = sorted(set(mask_dirs) - set(defect_dirs))
    if unknown:
        raise ValueError(f"mask folders given for unknown defect types {unknown}")
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out")
    for name in defect_dirs:
        if name.lower() == GOOD or not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid defect type name {name!r}")
    return out


def _good_images(good_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The images of all good-image folders, in folder order; at least one, and no two with
    the same file name (they all land in ``train/good`` or ``test/good`` under that name)."""
    good: list[Path] = []
    for folder in good_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"good-image folder {folder} does not exist")
        good.extend(_good_folder_images(folder))
    if not good:
        raise ValueError(f"no images in the good-image folders {[str(p) for p in good_dirs]}")
    names = [path.name for path in good]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"two good images are named {duplicate}; file names must be unique")
    return good


def _defect_images(
    defect_dirs: Mapping[str, str | os.PathLike],
    mask_dirs: Mapping[str, str | os.PathLike],
    good: Sequence[Path],
) -> dict[str, tuple[list[Path], dict[str, Path]]]:
    """{defect type: (its images, {image stem: mask})}; every type has images, no file serves
    twice (``_check_used_once``) and every image has a mask, since the test split's pixel
    metrics need a mask for each defect image."""
    defects: dict[str, tuple[list[Path], dict[str, Path]]] = {}
    where: dict[str, Path] = {}
    for name, folder in defect_dirs.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"defect folder {folder} does not exist")
        mask_dir = Path(mask_dirs[name]) if name in mask_dirs else None
        if mask_dir is not None and not mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder {mask_dir} does not exist")
        defects[name] = _images_and_masks(folder, mask_dir)
        where[name] = folder if mask_dir is None else mask_dir
        if not defects[name][0]:
            raise ValueError(f"defect folder {folder} contains no images")
    _check_used_once(good, defects)
    for name, (images, masks) in defects.items():
        missing = [image for image in images if image.stem not in masks]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(images)} images of defect type {name!r} have no mask "
                f"in {where[name]} (e.g. {missing[0].name}; expected {missing[0].stem}_mask.<ext> "
                f"or {missing[0].stem}.png)"
            )
    return defects


def _check_used_once(
    good: Sequence[Path], defects: Mapping[str, tuple[list[Path], dict[str, Path]]]
) -> None:
    """Refuses a source file (compared by resolved path) that would serve as two things: a
    good image and a defect image or mask (``--good D --defect D``), or images of two types."""
    roles = [("a good image", good)]
    for name, (images, masks) in defects.items():
        roles += [(f"a {name!r} image", images), (f"a {name!r} mask", list(masks.values()))]
    seen: dict[Path, tuple[str, Path]] = {}
    twice = []
    for role, paths in roles:
        for path in paths:
            first_role, first = seen.setdefault(path.resolve(), (role, path))
            if first_role != role:
                same = f"{path} ({first_role} and {role})"
                twice.append(same if first == path else f"{first} ({first_role}) = {path} ({role})")
    if twice:
        raise ValueError(
            f"{len(twice)} files would serve twice: {some_of(twice)}; the --good, --defect "
            "and --mask-dir folders must not share files"
        )


def _draw_train(
    good: list[Path], train_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(train, test) good images, each sorted by name: a seeded ``train_fraction`` of ``good``
    (at least one image) for training, so the same inputs and seed give the same split."""
    order = np.random.default_rng(seed).permutation(len(good))
    num_train = max(1, int(round(train_fraction * len(good))))
    train = sorted((good[i] for i in order[:num_train]), key=lambda p: p.name)
    test_good = sorted((good[i] for i in order[num_train:]), key=lambda p: p.name)
    return train, test_good


def _write_layout(
    out: Path,
    train: list[Path],
    test_good: list[Path],
    defects: Mapping[str, tuple[list[Path], dict[str, Path]]],
    copy: bool,
) -> None:
    """Links (or copies) the files into the MVTec layout at ``out``.

    The layout is assembled in a hidden sibling folder and renamed into place at the end; on
    any failure that folder is removed, so a failed run leaves nothing half-written.
    """
    staging = out.with_name(f".{out.name}.splitting")
    shutil.rmtree(staging, ignore_errors=True)
    place = shutil.copy2 if copy else os.symlink
    try:
        for folder, paths in (
            (staging / "train" / GOOD, train),
            (staging / "test" / GOOD, test_good),
        ):
            folder.mkdir(parents=True)
            for path in paths:
                place(path.absolute(), folder / path.name)
        for name, (images, masks) in defects.items():
            (staging / "test" / name).mkdir(parents=True)
            (staging / "ground_truth" / name).mkdir(parents=True)
            for image in images:
                mask = masks[image.stem]
                place(image.absolute(), staging / "test" / name / image.name)
                mask_name = f"{image.stem}{MASK_SUFFIX}{mask.suffix}"
                place(mask.absolute(), staging / "ground_truth" / name / mask_name)
        if out.exists():
            out.rmdir()  # empty, checked by _check_arguments
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def split_dataset(
    good_dirs: Sequence[str | os.PathLike],
    defect_dirs: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    mask_dirs: Mapping[str, str | os.PathLike] | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    copy: bool = False,
) -> str:
    """Writes the MVTec AD layout at ``out``; returns a one-line summary of the counts.

    Args:
      good_dirs: folders of defect-free images (empty masks beside them are left out).
      defect_dirs: {defect type: folder of its images}.
      out: the dataset folder to create; it must not exist (or be an empty folder).
      mask_dirs: {defect type: folder of its masks}, for types whose masks are not beside
        the images.
      train_fraction: share of the good images in ``train/good`` (at least one image goes
        there), drawn with ``numpy.random.default_rng(seed)`` from the sorted list.
      copy: copy the files instead of linking to them (absolute symbolic links).
    Raises:
      ValueError / FileNotFoundError naming the folder or file at fault; nothing is written.
    """
    mask_dirs = dict(mask_dirs or {})
    out = _check_arguments(defect_dirs, mask_dirs, out, train_fraction, seed)
    good = _good_images(good_dirs)
    defects = _defect_images(defect_dirs, mask_dirs, good)
    train, test_good = _draw_train(good, train_fraction, seed)
    with writing(out):  # a full disk names the dataset being written
        _write_layout(out, train, test_good, defects, copy)
    counts = ", ".join(f"{name} {len(images)}" for name, (images, _) in defects.items())
    return f"train/good {len(train)}, test/good {len(test_good)}" + (
        f", defects: {counts}" if counts else ""
    )
