"""The decoded-crop cache: the uint8 crops of image files on disk, so that a rerun decodes none.

One ``.npy`` file per crop, ``DIR/<geometry>/<hh>/<sha256>.npy``, read memory-mapped. The key
is the sha256 of the image file's bytes: a renamed or copied file hits, an edited one misses
whatever its mtime says. ``<geometry>`` names what changes a crop (resize, crop, resize mode)
and the Pillow version that resized it; nothing else (the backbone, the sampler) is in it, so
ensemble members and benchmark presets of one geometry share the entries.

Entries are written atomically (a temporary file, then one rename): concurrent runs may share a
folder, and a reader sees a whole entry or none. An entry whose header or size does not match
the crop it must hold (truncated, damaged) is never trusted: ``load_crop`` answers None, and the
caller decodes the image again and rewrites the entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import PIL

from patchcore_jax.files import atomic_path

FORMAT = "v1"  # of the entries; a new format starts a new folder


def geometry_folder(
    cache_dir: str | os.PathLike, resize: int, crop_shape: tuple[int, int], resize_mode: str
) -> Path:
    """The folder of the crops of one geometry, ``crop_shape`` = (height, width)."""
    height, width = crop_shape
    name = f"crops-{FORMAT}-pillow{PIL.__version__}-{resize_mode}-{resize}-{height}x{width}"
    return Path(cache_dir) / name


def content_key(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes: the cache key of its crops."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def entry_path(folder: Path, key: str) -> Path:
    """Where the crop of content ``key`` lives in a ``geometry_folder``."""
    return folder / key[:2] / f"{key}.npy"


def load_crop(entry: Path, shape: tuple[int, ...]) -> np.memmap | None:
    """The crop ``shape`` uint8 stored in ``entry``, memory-mapped; None if there is none or the
    entry is damaged (unreadable header, other dtype or shape, a size that is not header +
    data)."""
    try:
        crop = np.load(entry, mmap_mode="r", allow_pickle=False)
        size = os.path.getsize(entry)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):  # a damaged header, or data shorter than it says
        return None
    if not isinstance(crop, np.memmap) or crop.dtype != np.uint8 or crop.shape != shape:
        return None
    if crop.offset + crop.nbytes != size:
        return None
    return crop


def lookup(
    cache_dir: str | os.PathLike,
    path: str | os.PathLike,
    resize: int,
    crop_shape: tuple[int, int],
    resize_mode: str,
) -> tuple[Path, np.memmap | None]:
    """The entry of image file ``path``'s crop of this geometry and the crop it holds (None:
    absent or damaged). Raises OSError when the file cannot be read for its key."""
    folder = geometry_folder(cache_dir, resize, crop_shape, resize_mode)
    entry = entry_path(folder, content_key(path))
    return entry, load_crop(entry, (*crop_shape, 3))


def store_crop(entry: Path, crop: np.ndarray) -> None:
    """Writes ``crop`` to ``entry`` atomically (its folder created if missing); a concurrent
    writer of the same entry writes the same bytes, and the last rename wins."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(entry) as tmp, open(tmp, "wb") as file:
        np.save(file, np.ascontiguousarray(crop), allow_pickle=False)
