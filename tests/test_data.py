"""data.py on the real MVTec bottle folder and on small folder layouts built in tmp_path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_jax.data import (
    Dataset,
    Sample,
    find_mask,
    image_paths,
    load_dataset,
    validate_masks,
)


def write_image(path: Path, size: tuple[int, int] = (12, 10), value: int = 0) -> Path:
    """A tiny image of ``size`` (width, height); format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2:6, 3:8] = 255
    Image.fromarray(mask).save(path)
    return path


def make_layout(root: Path, *, train_good: bool = True) -> Path:
    """2 train images, test/good (2), test/crack (2, one with a mask), ground_truth/crack."""
    train = root / "train" / ("good" if train_good else "")
    for name in ("b.png", "a.png"):
        write_image(train / name)
    write_image(root / "test/good/000.png")
    write_image(root / "test/good/001.jpg")
    write_image(root / "test/crack/000.png")
    write_image(root / "test/crack/001.bmp")
    write_mask(root / "ground_truth/crack/000_mask.png")
    return root


def test_real_bottle_category(bottle_dir):
    dataset = load_dataset(bottle_dir)
    assert isinstance(dataset, Dataset) and dataset.root == bottle_dir
    assert len(dataset.train_paths) == 209 and len(dataset.test_samples) == 83
    assert dataset.train_paths == tuple(sorted(dataset.train_paths))
    assert all(p.parent == bottle_dir / "train" / "good" for p in dataset.train_paths)
    counts = Counter(s.defect_type for s in dataset.test_samples)
    assert counts == {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}
    assert dataset.defect_types == ["broken_large", "broken_small", "contamination"]
    np.testing.assert_array_equal(
        dataset.test_labels, [0 if s.defect_type == "good" else 1 for s in dataset.test_samples]
    )
    assert dataset.test_labels.sum() == 63
    # Every defect image has its mask (matched by name), good images have none.
    for sample in dataset.test_samples:
        if sample.label:
            mask_name = f"{sample.image_path.stem}_mask.png"
            assert sample.mask_path == bottle_dir / "ground_truth" / sample.defect_type / mask_name
            assert sample.mask_path.is_file()
        else:
            assert sample.mask_path is None
    # The reference's order: sorted defect folders, then sorted file names.
    first = dataset.test_samples[0]
    assert first == Sample(
        bottle_dir / "test/broken_large/000.png",
        1,
        "broken_large",
        bottle_dir / "ground_truth/broken_large/000_mask.png",
    )
    keys = [(s.defect_type, s.image_path.name) for s in dataset.test_samples]
    assert keys == sorted(keys)
    assert dataset.test_image_paths[0] == first.image_path
    assert dataset.test_mask_paths[-1] is None
    validate_masks(dataset)
    assert find_mask(first.image_path) == first.mask_path
    assert find_mask(bottle_dir / "test/good/000.png") is None
    assert find_mask(bottle_dir / "train/good/000.png") is None


def test_generic_layout_with_mixed_extensions_and_optional_masks(tmp_path):
    root = make_layout(tmp_path / "parts")
    (root / "test/crack/notes.txt").write_text("not an image")
    (root / "test/crack/.hidden.png").write_bytes(b"junk")
    write_image(root / "test/scratch/000.JPG")
    write_mask(root / "ground_truth/scratch/000_mask.TIFF")
    dataset = load_dataset(root)
    assert [p.name for p in dataset.train_paths] == ["a.png", "b.png"]
    summary = [
        (s.defect_type, s.image_path.name, s.label, s.mask_path and s.mask_path.name)
        for s in dataset.test_samples
    ]
    assert summary == [
        ("crack", "000.png", 1, "000_mask.png"),
        ("crack", "001.bmp", 1, None),  # a defect image without mask is allowed here
        ("good", "000.png", 0, None),
        ("good", "001.jpg", 0, None),
        ("scratch", "000.JPG", 1, "000_mask.TIFF"),
    ]
    validate_masks(dataset)


def test_train_images_directly_in_train_folder(tmp_path):
    dataset = load_dataset(make_layout(tmp_path / "loose", train_good=False))
    assert [p.name for p in dataset.train_paths] == ["a.png", "b.png"]
    assert all(p.parent == tmp_path / "loose/train" for p in dataset.train_paths)


def test_mvtec_named_category_requires_every_mask(tmp_path):
    root = make_layout(tmp_path / "screw")
    with pytest.raises(ValueError, match=r"001\.bmp has no mask"):
        load_dataset(root)
    dataset = load_dataset(root, require_masks=False)
    assert sum(s.mask_path is None for s in dataset.test_samples) == 3
    with pytest.raises(ValueError, match=r"001\.bmp has no mask"):
        load_dataset(make_layout(tmp_path / "mine"), require_masks=True)


def test_missing_root_train_and_test_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    root = make_layout(tmp_path / "a")
    (root / "train/good/a.png").unlink()
    (root / "train/good/b.png").unlink()
    with pytest.raises(ValueError, match=r"train/good contains no image"):
        load_dataset(root)
    for name in ("a.png", "b.png"):
        write_image(root / "train/good" / name)
    write_image(root / "train/stray.png")
    with pytest.raises(ValueError, match="both a good/ folder and loose images"):
        load_dataset(root)

    root = make_layout(tmp_path / "b")
    for path in (root / "train/good").iterdir():
        path.unlink()
    (root / "train/good").rmdir()
    with pytest.raises(ValueError, match=r"train contains no image"):
        load_dataset(root)
    (root / "train").rmdir()
    with pytest.raises(FileNotFoundError, match=r"b/train does not exist"):
        load_dataset(root)


def test_missing_or_empty_test_folder(tmp_path):
    root = tmp_path / "c"
    write_image(root / "train/good/0.png")
    with pytest.raises(FileNotFoundError, match=r"c/test does not exist"):
        load_dataset(root)
    (root / "test/good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"c/test contains no images"):
        load_dataset(root)
    write_image(root / "test/0.png")
    with pytest.raises(ValueError, match=r"test/0\.png directly in"):
        load_dataset(root)


def test_mask_problems_are_named(tmp_path):
    root = make_layout(tmp_path / "d")
    orphan = write_mask(root / "ground_truth/crack/007_mask.png")
    with pytest.raises(ValueError, match=r"007_mask\.png has no image"):
        load_dataset(root)
    orphan.unlink()

    misnamed = write_mask(root / "ground_truth/crack/001.png")
    with pytest.raises(ValueError, match=r"001\.png is not named <image stem>_mask"):
        load_dataset(root)
    misnamed.unlink()

    second = write_mask(root / "ground_truth/crack/000_mask.jpg")
    with pytest.raises(ValueError, match="two masks"):
        load_dataset(root)
    second.unlink()

    stray_dir = write_mask(root / "ground_truth/dent/000_mask.png")
    with pytest.raises(ValueError, match=r"ground_truth/dent has no test folder"):
        load_dataset(root)
    stray_dir.unlink()

    write_mask(root / "ground_truth/crack/000_mask.png", size=(13, 10))
    dataset = load_dataset(root)  # sizes are checked by validate_masks, from headers
    with pytest.raises(ValueError, match=r"000_mask\.png has size 13x10.*crack/000\.png"):
        validate_masks(dataset)


def test_image_paths_expands_folders_in_sorted_order(tmp_path):
    folder = tmp_path / "imgs"
    for name in ("b.png", "a.JPG", "c.tiff"):
        write_image(folder / name)
    (folder / "readme.txt").write_text("x")
    write_image(folder / "sub/z.png")
    single = write_image(tmp_path / "single.bmp")
    assert image_paths([single, folder]) == [
        single,
        folder / "a.JPG",
        folder / "b.png",
        folder / "c.tiff",
    ]
    assert image_paths(str(folder), recursive=True) == [
        folder / "a.JPG",
        folder / "b.png",
        folder / "c.tiff",
        folder / "sub/z.png",
    ]
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        image_paths([tmp_path / "ghost.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty contains no image"):
        image_paths([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no image paths"):
        image_paths([])
