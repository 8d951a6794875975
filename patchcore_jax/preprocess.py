"""Host-side input pipeline: read images and ground-truth masks, resize, centre-crop.

Reproduces the reference's torchvision pipeline on PIL images (README, "Image geometry"):
``Resize(resize)`` (shorter side to ``resize``, Pillow bilinear with antialiasing, longer side
``int(resize * long / short)``), then ``CenterCrop(crop)`` (top-left corner
``int(round((size - crop) / 2.0))``, Python's round-half-to-even). ``resize_mode="stretch"``
instead resizes the whole image to ``crop`` (height, width) without keeping its aspect ratio
and cuts nothing away, for non-square images whose ends the centre crop would lose. ``crop`` is
an int (square) or (height, width). Images stay uint8 here; the backbone normalises on the
device. ``to_float`` is the numpy form of ToTensor + Normalize.

Masks go through the same geometry; a pixel is a defect iff it is exactly 255 afterwards (the
reference's rule). Masks that are not 0/255 (anti-aliased or JPEG-damaged edges) are binarised
first at ``mask_threshold``, so binary masks keep the reference's numbers exactly. A colour mask
counts a pixel by its strongest colour channel (alpha ignored): a defect drawn in any colour is
a defect.

Before a workflow uses any image, ``check_images`` decodes each once and says which cannot be
used: unreadable files, and images so small that reaching the model input would enlarge them
more than ``MAX_UPSCALE`` times; images more elongated than ``MAX_ASPECT_RATIO`` are warned about.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from patchcore_jax import crop_cache
from patchcore_jax.config import RESIZE_MODES
from patchcore_jax.errors import ImageLoadError, ImageNotFoundError
from patchcore_jax.files import some_of
from patchcore_jax.image_reader import ImageReader

if TYPE_CHECKING:
    from patchcore_jax.config import PatchCoreConfig

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pillow modes holding more than 8 bits per sample; scaled to 8 bits (Pillow's convert clips).
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow modes of one gray channel (with alpha); masks of other modes are colour images.
_GRAY_MODES = ("L", "1", "LA", "La")
DEFAULT_MASK_THRESHOLD = 128

# An image is refused when resizing it to the model input would enlarge it more than this: its
# patches would be interpolation, not texture. Beyond MAX_ASPECT_RATIO, a warning: the centre crop
# sees a thin slice of the image (or stretching distorts it that much).
MAX_UPSCALE = 4.0
MAX_ASPECT_RATIO = 4.0

Size = int | tuple[int, int]
Unusable = list[tuple[Path, str]]  # (image path, why it cannot be used)
# What an error about unusable images adds where they may be skipped instead (predict, evaluate).
SKIP = "; fix or remove them, or skip them (CLI --skip-unreadable, library skip_unreadable=True)"


class MaskWarning(UserWarning):
    """A ground-truth mask was usable but suspicious (binarised, or marks no defect)."""


class ImageWarning(UserWarning):
    """An image is usable but will be seen in part or distorted (an extreme aspect ratio)."""


def image_options(config: PatchCoreConfig) -> dict[str, Any]:
    """The preprocessing arguments of ``config`` (``iter_image_batches``, ``load_mask`` & co.)."""
    return {"resize": config.resize, "crop": config.crop, "resize_mode": config.resize_mode}


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision ``Resize(resize)``: shorter side = ``resize``."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def center_crop_box(width: int, height: int, crop: Size) -> tuple[int, int, int, int]:
    """Pillow crop box (left, top, right, bottom) of torchvision ``CenterCrop(crop)``.

    ``crop``: an int (square) or (height, width), as torchvision takes it.
    """
    crop_height, crop_width = _pair(crop)
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return left, top, left + crop_width, top + crop_height


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    with _open(path) as image:
        return image.size


def geometry_problem(
    width: int,
    height: int,
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
) -> tuple[str | None, str | None]:
    """What is wrong with a ``width`` x ``height`` image as model input: ``(refusal, warning)``.

    Refused (a reason): reaching the input (shorter side to ``resize``, or with ``stretch`` the
    whole image to ``crop``) would enlarge it more than ``MAX_UPSCALE`` times, so its patches
    would be interpolation (a 1x1, 10x10 or 10000x50 image at resize 256). Warned (a reason): an
    aspect ratio beyond ``MAX_ASPECT_RATIO``:1, where the centre crop sees a thin slice of the
    image (or ``stretch`` distorts it that much). Either is None when there is nothing to say.
    """
    crop_height, crop_width = _pair(crop)
    if resize_mode == "stretch":
        upscale = max(crop_width / width, crop_height / height)
        target = f"stretched to {crop_height}x{crop_width}"
    else:
        upscale = resize / min(width, height)
        target = f"shorter side resized to {resize}"
    size = f"{width}x{height} pixels"
    if upscale > MAX_UPSCALE:
        refusal = (
            f"{size} is too small for the model input ({target}): it would be enlarged "
            f"{upscale:.3g}x, more than {MAX_UPSCALE:g}x"
        )
        return refusal, None
    if resize_mode == "stretch":
        distortion = (width / height) / (crop_width / crop_height)
        distortion = max(distortion, 1 / distortion)
        if distortion > MAX_ASPECT_RATIO:
            return None, f"{size} is stretched {distortion:.3g}x more one way than the other"
        return None, None
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        resized_width, resized_height = resized_size(width, height, resize)
        seen = crop_width / resized_width if width > height else crop_height / resized_height
        return None, (
            f"{size} (aspect ratio {ratio:.3g}:1): the centre crop sees {seen:.0%} of its "
            f"{'width' if width > height else 'height'} (--resize-mode stretch sees all of it)"
        )
    return None, None


def check_images(
    paths: Sequence[str | os.PathLike],
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
    num_threads: int | None = None,
    reader: ImageReader | None = None,
) -> Unusable:
    """Decodes every image once, as ``load_image`` does, before any is used: so one bad file
    among thousands is named before the work, not found in the middle of it.

    Returns ``(path, reason)`` of each image that cannot be used, in the order of ``paths``:
    unreadable (truncated, corrupt, missing) or too small (``geometry_problem``). Warns once
    (``ImageWarning``) naming the images of an extreme aspect ratio. ``reader`` decodes
    (``read_image``; default: ``num_threads`` threads, ``min(8, cpu_count)``); with its cache,
    an image whose crop is cached is not decoded again, and a decoded one's crop is stored,
    so that reading it next decodes nothing.
    """
    _check_sizes(resize, crop, resize_mode)
    reader = ImageReader() if reader is None else reader
    paths = [Path(path) for path in paths]
    check = functools.partial(
        _read_or_reason,
        resize=resize,
        crop=crop,
        resize_mode=resize_mode,
        cache_dir=reader.cache_dir,
    )
    found = []
    for reason, (width, height), decoded in reader.map(
        check, paths, in_flight=4 * max(reader.workers, num_threads or 8), threads=num_threads
    ):
        reader.count(decoded)
        if reason is not None:
            found.append((reason, None))
        else:
            found.append(geometry_problem(width, height, resize, crop, resize_mode=resize_mode))
    checked = list(zip(paths, found, strict=True))
    elongated = [f"{path} ({warning})" for path, (_, warning) in checked if warning]
    if elongated:
        warnings.warn(
            f"{len(elongated)} of {len(paths)} images are elongated: {some_of(elongated, 2)}",
            ImageWarning,
            stacklevel=2,
        )
    return [(path, refusal) for path, (refusal, _) in checked if refusal]


def describe_unusable(unusable: Unusable) -> str:
    """The first few unusable images with their reasons, on one line, and how many more."""
    return some_of([f"{path} ({' '.join(reason.split())})" for path, reason in unusable])


def refuse_unusable(
    unusable: Unusable, num_images: int, what: str, *, skip_unreadable: bool = False, hint: str = ""
) -> None:
    """Raises ValueError naming the ``unusable`` images of ``num_images`` ``what`` (then
    ``hint``), unless there are none or ``skip_unreadable`` and some images are left."""
    if unusable and (not skip_unreadable or len(unusable) == num_images):
        raise ValueError(
            f"{len(unusable)} of {num_images} {what} cannot be used: "
            f"{describe_unusable(unusable)}{'' if skip_unreadable else hint}"
        )


def check_mask_size(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> None:
    """Raises ValueError naming both files unless the mask has its image's original size."""
    image_wh = image_size(image_path)
    mask_wh = image_size(mask_path)
    if image_wh != mask_wh:
        raise ValueError(
            f"mask {mask_path} has size {mask_wh[0]}x{mask_wh[1]} but its image {image_path} "
            f"has size {image_wh[0]}x{image_wh[1]} (width x height); they must match"
        )


def load_image(
    path: str | os.PathLike,
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
) -> np.ndarray:
    """Reads an image as RGB, resizes the shorter side to ``resize``, centre-crops ``crop``
    (``resize_mode="stretch"``: resizes the whole image to ``crop``).

    Grayscale, palette, RGBA (alpha dropped, like PIL ``convert("RGB")``), CMYK and 16-bit
    images are converted to 8-bit RGB; 16-bit values are scaled (65535 -> 255), not clipped.
    EXIF orientation is not applied (the reference does not either).

    Returns:
      image: [height, width, 3] uint8, (height, width) = ``crop``.
    """
    return read_image(path, resize, crop, resize_mode=resize_mode).crop


class ImageRead(NamedTuple):
    """What ``read_image`` read: the crop [height, width, 3] uint8 (None unless kept), the
    image's original (width, height), and whether it was decoded (False: the cache had it)."""

    crop: np.ndarray | None
    size: tuple[int, int]
    decoded: bool


def read_image(
    path: str | os.PathLike,
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
    cache_dir: str | os.PathLike | None = None,
    keep: bool = True,
) -> ImageRead:
    """``load_image`` with the decoded-crop cache: the one function the reading threads and
    worker processes run (``image_reader``), so every path gives the same bits.

    With ``cache_dir`` (``crop_cache``), a sound cached crop of the file's content answers
    without decoding (the header is read for the size); else the image is decoded, resized
    and cropped, and its crop stored. ``keep=False``: the crop is not returned (the image
    check needs only a successful decode and the size). Raises ``ImageLoadError`` naming the
    file, as ``load_image`` does.
    """
    _check_sizes(resize, crop, resize_mode)
    entry = None
    if cache_dir is not None:
        size = image_size(path)  # a missing or foreign file is named here, as by load_image
        try:
            entry, cached = crop_cache.lookup(cache_dir, path, resize, _pair(crop), resize_mode)
        except OSError as error:
            raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error
        if cached is not None:
            return ImageRead(np.array(cached) if keep else None, size, decoded=False)
    rgb = _decoded_rgb(path)
    if not keep and entry is None:
        return ImageRead(None, rgb.size, decoded=True)
    pixels = np.asarray(_resize_and_crop(rgb, resize, crop, resize_mode), dtype=np.uint8)
    if entry is not None:
        crop_cache.store_crop(entry, pixels)
    return ImageRead(pixels if keep else None, rgb.size, decoded=True)


def _read_or_reason(path: Path, **options: Any) -> tuple[str | None, tuple[int, int], bool]:
    """``read_image(path, keep=False, **options)`` for the image check, run where it reads:
    (why the image is unreadable or None, its (width, height), whether it was decoded)."""
    try:
        read = read_image(path, keep=False, **options)
    except ImageLoadError as error:
        return error.reason, (0, 0), True
    return None, read.size, read.decoded


def load_mask(
    path: str | os.PathLike | None,
    resize: int = 256,
    crop: Size = 224,
    *,
    image_path: str | os.PathLike | None = None,
    resize_mode: str = "shorter-side",
    threshold: int = DEFAULT_MASK_THRESHOLD,
) -> np.ndarray:
    """Reads a ground-truth mask with the image pipeline; a pixel is a defect iff it is 255.

    The mask is read as 8-bit grayscale (binary "1" masks become 0/255, 16-bit masks are
    scaled), resized bilinearly and cropped like its image; only pixels that are exactly 255
    afterwards are defects (the reference's ``int(value / 255)``, which drops blurred edges).
    Masks stored as 0/1 are read as 0/255. Masks with other values (anti-aliased or
    JPEG-damaged edges) are binarised first: ``value >= threshold`` becomes 255, the rest 0,
    with a ``MaskWarning``; so is a mask that marks no defect pixel. ``path=None`` means no
    defect pixels. With ``image_path``, the mask's original size must equal the image's.

    Returns:
      mask: [height, width] bool, (height, width) = ``crop``.
    """
    mask, binarised, empty = _load_mask(
        path, resize, crop, image_path=image_path, resize_mode=resize_mode, threshold=threshold
    )
    if binarised:
        warnings.warn(
            f"mask {path} is not 0/255; binarised at >= {threshold}", MaskWarning, stacklevel=2
        )
    if empty:
        warnings.warn(f"mask {path} marks no defect pixel", MaskWarning, stacklevel=2)
    return mask


def _load_mask(
    path: str | os.PathLike | None,
    resize: int,
    crop: Size,
    *,
    image_path: str | os.PathLike | None,
    resize_mode: str,
    threshold: int,
) -> tuple[np.ndarray, bool, bool]:
    """``load_mask`` without warnings: (mask, whether it was binarised, whether it is empty)."""
    _check_sizes(resize, crop, resize_mode)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 255:
        raise ValueError(f"mask threshold must be an integer in 1..255, got {threshold!r}")
    if path is None:
        return np.zeros(_pair(crop), dtype=bool), False, False
    if image_path is not None:
        check_mask_size(image_path, path)
    return _mask_from_values(decode_mask(path), resize, crop, resize_mode, threshold)


def _mask_from_values(
    values: np.ndarray, resize: int, crop: Size, resize_mode: str, threshold: int
) -> tuple[np.ndarray, bool, bool]:
    """The reference's mask rule on decoded 8-bit values [H, W]: (mask, binarised, empty)."""
    max_value = int(values.max()) if values.size else 0
    binarised = False
    gray = Image.fromarray(values)
    if max_value == 1:
        gray = Image.fromarray((values * 255).astype(np.uint8))
    elif np.any((values != 0) & (values != 255)):
        gray = Image.fromarray(np.where(values >= threshold, 255, 0).astype(np.uint8))
        binarised = True
    mask = np.asarray(_resize_and_crop(gray, resize, crop, resize_mode)) == 255
    return mask, binarised, max_value == 0 or (binarised and max_value < threshold)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """An image file at full resolution as ``load_image`` decodes it: [H, W, 3] uint8 RGB."""
    return np.asarray(_decoded_rgb(path), dtype=np.uint8)


def _decoded_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file decoded to 8-bit RGB (``load_image``); failures name ``path``."""
    with _open(path) as image:
        try:
            return _to_8bit(image, path).convert("RGB")
        except ImageLoadError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable".
            raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file at full resolution as ``load_mask`` decodes it: [H, W] uint8.

    Grayscale (and binary, 16-bit, gray + alpha) masks give their gray values. A colour mask
    (RGB, RGBA, palette, ...) gives each pixel's largest colour channel, alpha ignored: a pixel
    is as much a defect as its strongest channel, so a red (255, 0, 0) defect is 255 (a luma
    conversion would make it 76 and binarise it away), and a mask whose channels are 0 or 255
    marks a defect wherever any channel is non-zero.
    """
    with _open(path) as image:
        try:
            gray = _to_8bit(image, path)
            if gray.mode not in _GRAY_MODES:  # colour: the strongest channel of each pixel
                return np.asarray(gray.convert("RGB"), dtype=np.uint8).max(axis=2)
            return np.asarray(gray if gray.mode == "L" else gray.convert("L"), dtype=np.uint8)
        except ImageLoadError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable".
            raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def image_from_array(
    pixels: np.ndarray, resize: int = 256, crop: Size = 224, *, resize_mode: str = "shorter-side"
) -> np.ndarray:
    """``load_image`` for decoded pixels: uint8 [H, W, 3] (or [H, W], [H, W, 1]) -> uint8
    [height, width, 3] of ``crop``, resized and cropped exactly as from a file."""
    _check_sizes(resize, crop, resize_mode)
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"image pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    rgb = Image.fromarray(pixels).convert("RGB")
    return np.asarray(_resize_and_crop(rgb, resize, crop, resize_mode), dtype=np.uint8)


def mask_from_array(
    values: np.ndarray,
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
    threshold: int = DEFAULT_MASK_THRESHOLD,
) -> np.ndarray:
    """``load_mask`` for decoded 8-bit values [H, W] (or [H, W, 1]) -> [height, width] bool.

    The same rule: 0/1 masks read as 0/255, other values binarised at ``threshold``, only 255
    after resizing is a defect; no warnings (the caller knows its masks).
    """
    _check_sizes(resize, crop, resize_mode)
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.dtype != np.uint8 or values.ndim != 2:
        raise ValueError(f"mask values must be uint8 [H, W], got {values.dtype} {values.shape}")
    return _mask_from_values(values, resize, crop, resize_mode, threshold)[0]


def load_images(
    paths: Sequence[str | os.PathLike],
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
) -> np.ndarray:
    """``load_image`` of each path, stacked.

    Returns:
      images: [len(paths), height, width, 3] uint8.
    """
    images = np.empty((len(paths), *_pair(crop), 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        images[index] = load_image(path, resize, crop, resize_mode=resize_mode)
    return images


def load_masks(
    paths: Sequence[str | os.PathLike | None],
    resize: int = 256,
    crop: Size = 224,
    *,
    image_paths: Sequence[str | os.PathLike] | None = None,
    resize_mode: str = "shorter-side",
    threshold: int = DEFAULT_MASK_THRESHOLD,
) -> np.ndarray:
    """``load_mask`` of each path (``None``: all normal), stacked; sizes checked with images.

    Warns once (``MaskWarning``) with the number of masks that were binarised and once with
    those that mark no defect pixel, naming the first of each.

    Returns:
      masks: [len(paths), height, width] bool.
    """
    if image_paths is not None and len(image_paths) != len(paths):
        raise ValueError(
            f"load_masks: got {len(paths)} mask paths but {len(image_paths)} image paths"
        )
    masks = np.zeros((len(paths), *_pair(crop)), dtype=bool)
    binarised, empty = [], []
    for index, path in enumerate(paths):
        image_path = None if image_paths is None else image_paths[index]
        masks[index], was_binarised, is_empty = _load_mask(
            path,
            resize,
            crop,
            image_path=image_path,
            resize_mode=resize_mode,
            threshold=threshold,
        )
        if was_binarised:
            binarised.append(path)
        if is_empty:
            empty.append(path)
    num_masks = sum(path is not None for path in paths)
    if binarised:
        warnings.warn(
            f"{len(binarised)} of {num_masks} masks are not 0/255 (e.g. {binarised[0]}); "
            f"binarised at >= {threshold}",
            MaskWarning,
            stacklevel=2,
        )
    if empty:
        warnings.warn(
            f"{len(empty)} of {num_masks} masks mark no defect pixel (e.g. {empty[0]})",
            MaskWarning,
            stacklevel=2,
        )
    return masks


def iter_image_batches(
    paths: Sequence[str | os.PathLike],
    batch_size: int,
    resize: int = 256,
    crop: Size = 224,
    *,
    resize_mode: str = "shorter-side",
    num_threads: int | None = None,
    reader: ImageReader | None = None,
) -> Iterator[np.ndarray]:
    """Yields ``load_image`` results in batches, in the order of ``paths``.

    ``reader`` reads them (``read_image``): in its worker processes and through its crop
    cache; by default on ``num_threads`` threads (default ``min(8, cpu_count)``; Pillow
    releases the GIL while decoding and resizing). At most two batches of images are read
    ahead, so memory stays bounded for any number of paths. The last batch may be shorter.

    Yields:
      images: [<= batch_size, height, width, 3] uint8.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_sizes(resize, crop, resize_mode)
    reader = ImageReader() if reader is None else reader
    options = {"resize": resize, "crop": crop, "resize_mode": resize_mode}
    read = functools.partial(read_image, **options, cache_dir=reader.cache_dir)
    reads = reader.map(read, list(paths), in_flight=2 * batch_size, threads=num_threads)
    batch = []
    for image in reads:
        reader.count(image.decoded)
        batch.append(image.crop)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def to_float(
    images: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """torchvision ``ToTensor`` + ``Normalize`` in float32, channels last, same op order.

    ``(images / 255 - mean) / std`` with every step rounded to float32, as torch does.

    Args:
      images: [..., H, W, C] uint8.
      mean, std: [C] per-channel statistics.
    Returns:
      [..., H, W, C] float32.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 images, got dtype {images.dtype}")
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    if mean_array.shape != (images.shape[-1],) or std_array.shape != (images.shape[-1],):
        raise ValueError(
            f"mean and std need one value per channel ({images.shape[-1]}), "
            f"got {mean_array.shape} and {std_array.shape}"
        )
    scaled = images.astype(np.float32) / np.float32(255.0)
    return (scaled - mean_array) / std_array


def _pair(crop: Size) -> tuple[int, int]:
    """(height, width) of an int or (height, width) size."""
    if isinstance(crop, int | np.integer) and not isinstance(crop, bool):
        return int(crop), int(crop)
    height, width = crop
    return int(height), int(width)


def _check_sizes(resize: int, crop: Size, resize_mode: str = "shorter-side") -> None:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if not isinstance(resize, int) or isinstance(resize, bool) or resize < 1:
        raise ValueError(f"resize must be a positive integer, got {resize!r}")
    sizes = crop if isinstance(crop, tuple | list) else (crop,)
    if len(sizes) not in (1, 2) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in sizes
    ):
        raise ValueError(f"crop must be a positive integer or (height, width), got {crop!r}")
    if resize_mode == "shorter-side" and max(sizes) > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")


def _open(path: str | os.PathLike) -> Image.Image:
    """PIL image opened lazily (header read); failures raise errors naming ``path``."""
    if path is None:
        raise ValueError("image path is None")
    if not os.path.exists(path):
        raise ImageNotFoundError(path, "no such file")
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        return Image.open(path)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable".
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def _to_8bit(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Decodes ``image``; 16-bit grayscale becomes mode "L" with 0..65535 -> 0..255."""
    image.load()
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageLoadError(
                path, f"{image.mode} image has values outside 0..65535; cannot scale to 8 bits"
            )
        scaled = (values * 255 + 32767) // 65535  # round(v * 255 / 65535)
        return Image.fromarray(scaled.astype(np.uint8))
    if image.mode == "F":
        raise ImageLoadError(path, "floating-point images (mode F) are not supported")
    return image


def _resize_and_crop(
    image: Image.Image, resize: int, crop: Size, resize_mode: str = "shorter-side"
) -> Image.Image:
    if resize_mode == "stretch":
        height, width = _pair(crop)
        if (width, height) == image.size:
            return image
        return image.resize((width, height), Image.BILINEAR)
    width, height = resized_size(*image.size, resize)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BILINEAR)
    return image.crop(center_crop_box(width, height, crop))


def _not_uint8_message(batch: np.ndarray) -> str:
    """Why a non-uint8 image batch is refused, with its dtype and value range."""
    described = f"dtype {batch.dtype}"
    if batch.size and np.issubdtype(batch.dtype, np.number):
        values = batch.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            described += f", values {finite.min():g}..{finite.max():g}"
        if finite.size < values.size:
            described += f", {values.size - finite.size} non-finite"
    return (
        "images must be uint8 RGB pixels 0..255 (what patchcore_jax.preprocess produces); got "
        f"{described}. Scores of other ranges would silently differ: convert explicitly, e.g. "
        "np.round(x * 255).astype(np.uint8) for floats in 0..1"
    )


def checked_batches(
    images: np.ndarray | Iterable[np.ndarray], batch_size: int, image_shape: tuple[int, int, int]
) -> Iterator[np.ndarray]:
    """Host batches of at most ``batch_size`` images from an array [N, *image_shape] (numpy or
    jax) or an iterable of such batches: what ``PatchCore`` embeds and scores.

    Every batch must be uint8 [B, *image_shape] (the preprocessed crops the model was built
    for): other dtypes and ranges are refused rather than scored differently, and a list of
    single images (not batches) is refused with the convention.
    """
    expected = ", ".join(map(str, ("B", *image_shape)))
    for batch in [images] if hasattr(images, "shape") else images:
        batch = np.asarray(batch)
        if batch.shape == image_shape:
            raise ValueError(
                f"images must be an array [{expected}] or an iterable of such batches, got one "
                f"image {batch.shape} where a batch was expected: pass np.stack(images) for a "
                "list of images (image[None] for one)"
            )
        if batch.ndim != 4 or batch.shape[1:] != image_shape:
            raise ValueError(
                f"images must be preprocessed crops [{expected}], got {batch.shape}: read files "
                "with preprocess.load_images or iter_image_batches, or resize and crop decoded "
                "pixels with preprocess.image_from_array (the model's resize and crop)"
            )
        if batch.dtype != np.uint8:
            raise ValueError(_not_uint8_message(batch))
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start : start + batch_size]
