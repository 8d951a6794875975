"""datasets/split.py: the MVTec AD layout from unsplit folders, on a Magnetic-Tile-like set."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import make_magnetic_tiles

from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.datasets.split import default_defect_name, split_dataset


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def tiles(tmp_path) -> Path:
    return make_magnetic_tiles(tmp_path / "source")


def test_magnetic_tile_layout_becomes_an_mvtec_category(tiles, tmp_path):
    before = digest_tree(tiles)
    holes = tiles / "MT_Blowhole" / "Imgs"
    summary = split_dataset(
        [tiles / "MT_Free" / "Imgs"], {"blowhole": holes}, tmp_path / "split", seed=3
    )
    assert summary == "train/good 8, test/good 2, defects: blowhole 4"
    dataset = load_dataset(tmp_path / "split")
    assert len(dataset.train_paths) == 8
    assert [s.label for s in dataset.test_samples].count(1) == 4
    for sample in dataset.test_samples:
        if sample.label:  # each defect image is paired with its own mask, linked to the source
            assert sample.mask_path.name == f"{sample.image_path.stem}_mask.png"
            assert os.readlink(sample.mask_path) == str(holes / f"{sample.image_path.stem}.png")
            assert os.readlink(sample.image_path) == str(holes / sample.image_path.name)
        else:
            assert sample.mask_path is None
    # Masks beside the good images are not images; the sources are untouched.
    assert all(path.suffix == ".jpg" for path in dataset.train_paths)
    assert digest_tree(tiles) == before


def test_train_draw_is_seeded_and_covers_every_good_image_once(tiles, tmp_path):
    def train_names(seed, name):
        split_dataset([tiles / "MT_Free" / "Imgs"], {}, tmp_path / name, seed=seed)
        return sorted(p.name for p in (tmp_path / name / "train" / "good").iterdir()), sorted(
            p.name for p in (tmp_path / name / "test" / "good").iterdir()
        )

    first, second, other = train_names(0, "a"), train_names(0, "b"), train_names(1, "c")
    assert first == second and first != other
    assert sorted(first[0] + first[1]) == sorted(
        p.name for p in (tiles / "MT_Free" / "Imgs").glob("*.jpg")
    )
    # the draw is numpy's permutation of the sorted names, as documented
    names = sorted(p.name for p in (tiles / "MT_Free" / "Imgs").glob("*.jpg"))
    order = np.random.default_rng(0).permutation(len(names))
    assert first[0] == sorted(names[i] for i in order[:8])


def test_copies_and_mask_folders(tiles, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    for path in (tiles / "MT_Blowhole" / "Imgs").iterdir():
        target = masks if path.suffix == ".png" else images
        (target / path.name).write_bytes(path.read_bytes())
    split_dataset(
        [tiles / "MT_Free" / "Imgs"],
        {"hole": images},
        tmp_path / "split",
        mask_dirs={"hole": masks},
        copy=True,
        train_fraction=0.5,
    )
    dataset = load_dataset(tmp_path / "split")
    assert len(dataset.train_paths) == 5
    defective = [s for s in dataset.test_samples if s.label]
    assert len(defective) == 4
    for sample in defective:
        assert not sample.image_path.is_symlink() and not sample.mask_path.is_symlink()
        original = masks / f"{sample.image_path.stem}.png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(sample.mask_path)), np.asarray(Image.open(original))
        )


def test_bad_input_names_the_folder_and_writes_nothing(tiles, tmp_path):
    holes = tiles / "MT_Blowhole" / "Imgs"
    missing_mask = next(holes.glob("*.png"))
    missing_mask.rename(tmp_path / missing_mask.name)
    with pytest.raises(
        ValueError,
        match=f"1 of 4 images of defect type 'blowhole' have no mask.*{missing_mask.stem}",
    ):
        split_dataset([tiles / "MT_Free" / "Imgs"], {"blowhole": holes}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="occupied"):
        split_dataset([tiles / "MT_Free" / "Imgs"], {}, occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="train_fraction"):
        split_dataset([tiles / "MT_Free" / "Imgs"], {}, tmp_path / "out", train_fraction=0.0)
    clash = tmp_path / "clash"
    clash.mkdir()
    for suffix in (".jpg", ".bmp"):
        Image.new("RGB", (8, 8)).save(clash / f"a{suffix}")
    with pytest.raises(ValueError, match="share the name 'a'"):
        split_dataset([tiles / "MT_Free" / "Imgs"], {"x": clash}, tmp_path / "out")
    with pytest.raises(ValueError, match="invalid defect type name 'good'"):
        split_dataset([tiles / "MT_Free" / "Imgs"], {"good": holes}, tmp_path / "out")


def test_default_defect_names():
    assert default_defect_name(Path("data/MT_Blowhole/Imgs")) == "MT_Blowhole"
    assert default_defect_name(Path("data/scratch")) == "scratch"


def test_good_and_defect_folders_sharing_files_are_refused_naming_them(tiles, tmp_path):
    holes = tiles / "MT_Blowhole" / "Imgs"
    links = tmp_path / "links"  # the same files through links: compared by resolved path
    links.mkdir()
    target = sorted(holes.glob("*.jpg"))[-1]
    (links / "other.jpg").symlink_to(target)
    shared = {  # --good D --defect D; a link in a good folder to a defect image
        holes: f"{sorted(holes.glob('*.jpg'))[0]} (a good image and a 'blowhole' image)",
        links: f"{links / 'other.jpg'} (a good image) = {target} (a 'blowhole'",
    }
    for folder, first in shared.items():
        with pytest.raises(ValueError, match="would serve twice: ") as info:
            split_dataset([tiles / "MT_Free" / "Imgs", folder], {"blowhole": holes}, tmp_path / "o")
        assert first in str(info.value)
        assert not (tmp_path / "o").exists()


def test_an_image_beside_a_same_stem_image_in_a_good_folder_is_an_image_not_a_mask(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.jpg", "x.png", "y.jpg"):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(good / name)
    Image.fromarray(np.zeros((70, 90), np.uint8)).save(good / "y.png")  # y.jpg's empty mask
    with pytest.warns(UserWarning, match=r"share a name stem \(x.jpg and x.png\)"):
        summary = split_dataset([good], {}, tmp_path / "split", train_fraction=1.0)
    assert summary == "train/good 3, test/good 0"
    names = sorted(p.name for p in (tmp_path / "split/train/good").iterdir())
    assert names == ["x.jpg", "x.png", "y.jpg"]


def test_a_negative_seed_is_refused_naming_the_option(tiles, tmp_path, capsys):
    from patchcore_jax import cli

    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got -1"):
        split_dataset([tiles / "MT_Free" / "Imgs"], {}, tmp_path / "out", seed=-1)
    args = ["split", "--good", str(tiles / "MT_Free" / "Imgs"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--seed", "-1"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "argument --seed: expected an integer in [0, 2**32)" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
