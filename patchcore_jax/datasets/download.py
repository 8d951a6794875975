"""Downloads for users who are online: MVTec AD from its official archive, verified.

``fetch_mvtec_ad`` streams the official archive (about 5 GB) into the destination folder with a
progress bar, checks its sha256 before anything is unpacked, and unpacks only the requested
categories, each into a hidden staging folder renamed into place when complete, so an
interrupted or failed fetch never leaves a half-written category behind. Categories already
present are not fetched again.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from patchcore_jax.datasets.folders import MVTEC_AD_CATEGORIES
from patchcore_jax.files import download_file, first_line, writing

MVTEC_AD_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
    "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_AD_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
# Files beside the categories in the archive (the licence and the dataset's readme).
_ARCHIVE_NOTES = ("license.txt", "readme.txt")
# What a damaged, truncated or unsafe (a member outside its folder: tarfile's "data" filter)
# archive raises while it is read.
_BAD_ARCHIVE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)


def _complete(category_dir: Path) -> bool:
    return all((category_dir / part).is_dir() for part in ("train", "test"))


def fetch_mvtec_ad(
    out_dir: str | os.PathLike,
    categories: Sequence[str] | None = None,
    *,
    url: str = MVTEC_AD_URL,
    sha256: str = MVTEC_AD_SHA256,
) -> list[Path]:
    """Downloads MVTec AD and unpacks ``categories`` (default: all 15) into ``out_dir``.

    Args:
      out_dir: folder that receives ``<category>/`` folders (created if missing).
      categories: names from ``folders.MVTEC_AD_CATEGORIES``; checked before any download.
      url, sha256: the archive and its checksum (a mirror or a local ``file://`` copy).
    Returns:
      The category folders, in the order asked.
    Raises:
      ValueError: unknown categories, a download whose sha256 differs (deleted), or an archive
        that is damaged, truncated or holds a path outside its folder (nothing of it is kept).
      OSError: the URL cannot be read, or the destination cannot be written (naming it).
    """
    categories = list(MVTEC_AD_CATEGORIES if categories is None else categories)
    unknown = [name for name in categories if name not in MVTEC_AD_CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"unknown MVTec AD categories {unknown}; known: {MVTEC_AD_CATEGORIES}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; give a folder for the dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / name for name in categories]
    missing = [
        name for name, target in zip(categories, targets, strict=True) if not _complete(target)
    ]
    if not missing:
        return targets
    for name in missing:
        if (out_dir / name).exists():
            raise FileExistsError(
                f"{out_dir / name} exists but is not a complete category (no train/ and test/); "
                "remove it to fetch it again"
            )
    handle, temporary = tempfile.mkstemp(prefix=".mvtec_ad.", suffix=".tar.xz", dir=out_dir)
    os.close(handle)
    archive = Path(temporary)
    try:
        digest = download_file(url, archive, "MVTec AD")
        if digest != sha256:
            raise ValueError(
                f"{url}: sha256 {digest} is not the expected {sha256}; the download is corrupt "
                "or not the MVTec AD archive (deleted)"
            )
        try:
            with writing(out_dir):
                _unpack(archive, out_dir, missing)
        except _BAD_ARCHIVE as error:
            raise ValueError(
                f"{url} is not a readable, safe MVTec AD archive: {first_line(error).rstrip(':')}; "
                "no category was unpacked"
            ) from error
    finally:
        archive.unlink(missing_ok=True)
    absent = [name for name in missing if not _complete(out_dir / name)]
    if absent:
        raise ValueError(f"{url}: the archive holds no complete categories {absent}")
    return targets


def _unpack(archive: Path, out_dir: Path, categories: Sequence[str]) -> None:
    """Unpacks each category of ``archive`` into a staging folder, renamed when complete (the
    licence and readme too, once the whole archive has been read)."""
    staging = {name: out_dir / f".{name}.fetching" for name in categories}
    notes = out_dir / ".notes.fetching"
    folders = [*staging.values(), notes]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                top, _, rest = member.name.lstrip("./").partition("/")
                if top in staging and rest:
                    member.name = rest
                    tar.extract(member, staging[top], filter="data")
                elif member.isfile() and member.name.lstrip("./") in _ARCHIVE_NOTES:
                    tar.extract(member, notes, filter="data")
        for name, folder in staging.items():
            if _complete(folder):
                os.replace(folder, out_dir / name)
        for note in notes.glob("*") if notes.is_dir() else []:
            os.replace(note, out_dir / note.name)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
