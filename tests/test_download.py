"""datasets/download.py: MVTec AD fetch from a local archive (file:// URL), verified, unpacked."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from conftest import DEMO_BOTTLE

from patchcore_jax.datasets.download import fetch_mvtec_ad
from patchcore_jax.datasets.folders import load_dataset


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[str, str]:
    """A small archive in the official layout: bottle (a real subset) and cable, + licence."""
    root = tmp_path_factory.mktemp("archive")
    path = root / "mvtec_anomaly_detection.tar.xz"
    files = [*sorted((DEMO_BOTTLE / "train/good").glob("*.png"))[:3]]
    files += sorted((DEMO_BOTTLE / "test/good").glob("*.png"))[:2]
    files += sorted((DEMO_BOTTLE / "test/broken_large").glob("*.png"))[:2]
    files += sorted((DEMO_BOTTLE / "ground_truth/broken_large").glob("*.png"))[:2]
    with tarfile.open(path, "w:xz") as tar:
        tar.add(DEMO_BOTTLE / "license.txt", "license.txt")
        for file in files:
            relative = file.relative_to(DEMO_BOTTLE)
            tar.add(file, f"bottle/{relative}")
            tar.add(file, f"cable/{relative}")
    return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verifies_and_unpacks_only_the_requested_categories(archive, tmp_path):
    url, sha256 = archive
    out = tmp_path / "mvtec"
    (folder,) = fetch_mvtec_ad(out, ["bottle"], url=url, sha256=sha256)
    assert folder == out / "bottle"
    dataset = load_dataset(folder)
    assert len(dataset.train_paths) == 3 and len(dataset.test_samples) == 4
    original = DEMO_BOTTLE / "test/broken_large/000.png"
    assert (folder / "test/broken_large/000.png").read_bytes() == original.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["bottle", "license.txt"]
    # present categories are not fetched again (a wrong checksum would fail otherwise)
    assert fetch_mvtec_ad(out, ["bottle"], url=url, sha256="0" * 64) == [folder]


def test_a_wrong_checksum_or_bad_input_leaves_nothing_behind(archive, tmp_path):
    url, _ = archive
    out = tmp_path / "mvtec"
    with pytest.raises(ValueError, match="sha256 .* is not the expected 0000"):
        fetch_mvtec_ad(out, ["cable"], url=url, sha256="0" * 64)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match=r"unknown MVTec AD categories \['bottel'\]"):
        fetch_mvtec_ad(out, ["bottel"], url=url)
    with pytest.raises(OSError, match="cannot download file:///no/such/archive.tar.xz"):
        fetch_mvtec_ad(out, ["cable"], url="file:///no/such/archive.tar.xz")
    assert list(out.iterdir()) == []


def test_cli_data_fetch(archive, tmp_path):
    from test_cli import run_cli

    url, sha256 = archive
    out = tmp_path / "mvtec"
    args = ["--url", url, "--sha256", sha256, "--out", out]
    result = run_cli("data", "fetch", "mvtec-ad", "--categories", "cable", *args)
    assert "categories ready" in result.stderr and (out / "cable/train/good").is_dir()
    bad = run_cli("data", "fetch", "mvtec-ad", "--categories", "nope", *args, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "unknown MVTec AD categories ['nope']" in bad.stderr


def _traversal_archive(path):
    """A tar.xz whose second member climbs out of the folder it is unpacked into."""
    with tarfile.open(path, "w:xz") as tar:
        for name, data in (("bottle/train/good/000.png", b"png"), ("bottle/../../evil.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda path, good: path.write_bytes(b"\xfd7zXZ\x00" + bytes(range(256)) * 8), "ReadError"),
        (lambda path, good: path.write_bytes(good[: len(good) // 2]), "EOFError"),
        (lambda path, good: _traversal_archive(path), "OutsideDestinationError"),
    ],
    ids=["corrupt", "truncated", "path-traversal"],
)
def test_a_damaged_or_unsafe_archive_is_one_line_naming_it_and_unpacks_nothing(
    archive, tmp_path, make, reason, capsys
):
    from patchcore_jax import cli

    url, _ = archive
    bad = tmp_path / "archives" / "bad.tar.xz"
    bad.parent.mkdir()
    make(bad, Path(url.removeprefix("file://")).read_bytes())
    sha256 = hashlib.sha256(bad.read_bytes()).hexdigest()  # the download itself is intact
    out = tmp_path / "a" / "b" / "mvtec"
    with pytest.raises(ValueError, match=f"^{bad.as_uri()} is not a readable, safe MVTec AD"):
        fetch_mvtec_ad(out, ["bottle"], url=bad.as_uri(), sha256=sha256)
    args = ["--url", bad.as_uri(), "--sha256", sha256, "--out", out]
    assert cli.main(["data", "fetch", "mvtec-ad", *map(str, args)]) == 2
    stderr = capsys.readouterr().err  # the download's progress bar, then one line
    (line,) = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert stderr.rstrip().endswith(line) and line.startswith("patchcore-jax: error: "), stderr
    assert bad.as_uri() in line and reason in line, line
    left = sorted(p.name for p in out.iterdir())  # the licence may come first in the archive
    assert left in ([], ["license.txt"]), left  # no category, staging folder or archive copy
    outside = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert outside == ["bad.tar.xz"], outside  # nothing escaped


def test_demo_category_ships_its_licence_and_attribution():
    readme = (DEMO_BOTTLE / "README.md").read_text()
    assert "Attribution-NonCommercial-ShareAlike 4.0" in readme and "Bergmann" in readme
    assert "Attribution-NonCommercial-ShareAlike" in (DEMO_BOTTLE / "license.txt").read_text()
    assert len(list((DEMO_BOTTLE / "train/good").glob("*.png"))) == 70
    assert sum(f.stat().st_size for f in DEMO_BOTTLE.rglob("*")) < 15 * 2**20
