"""datasets/folders.py on the real MVTec bottle folder and on small layouts built in tmp_path."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_jax.datasets.folders import (
    OUTPUT_MARKER,
    Dataset,
    DatasetWarning,
    Sample,
    find_mask,
    image_paths,
    load_dataset,
    load_train_paths,
    load_validation_folder,
    same_files,
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


def make_layout(root: Path, *, train_good: bool = True, missing_mask: bool = False) -> Path:
    """2 train images, test/good (2), test/crack (2 with masks, or one with ``missing_mask``)."""
    train = root / "train" / ("good" if train_good else "")
    for name in ("b.png", "a.png"):
        write_image(train / name)
    write_image(root / "test/good/000.png")
    write_image(root / "test/good/001.jpg")
    write_image(root / "test/crack/000.png")
    write_image(root / "test/crack/001.bmp")
    write_mask(root / "ground_truth/crack/000_mask.png")
    if not missing_mask:
        write_mask(root / "ground_truth/crack/001_mask.png")
    return root


@pytest.mark.shared_data
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
    root = make_layout(tmp_path / "parts", missing_mask=True)
    (root / "test/crack/notes.txt").write_text("not an image")
    (root / "test/crack/.hidden.png").write_bytes(b"junk")
    write_image(root / "test/scratch/000.JPG")
    write_mask(root / "ground_truth/scratch/000_mask.TIFF")
    dataset = load_dataset(root, allow_missing_masks=True)
    assert [p.name for p in dataset.train_paths] == ["a.png", "b.png"]
    summary = [
        (s.defect_type, s.image_path.name, s.label, s.mask_path and s.mask_path.name)
        for s in dataset.test_samples
    ]
    assert summary == [
        ("crack", "000.png", 1, "000_mask.png"),
        ("crack", "001.bmp", 1, None),  # allowed: left out of the pixel metrics
        ("good", "000.png", 0, None),
        ("good", "001.jpg", 0, None),
        ("scratch", "000.JPG", 1, "000_mask.TIFF"),
    ]
    assert dataset.has_pixel_labels.tolist() == [True, False, True, True, True]
    validate_masks(dataset)


def test_train_images_directly_in_train_folder(tmp_path):
    dataset = load_dataset(make_layout(tmp_path / "loose", train_good=False))
    assert [p.name for p in dataset.train_paths] == ["a.png", "b.png"]
    assert all(p.parent == tmp_path / "loose/train" for p in dataset.train_paths)


def test_every_defect_image_needs_a_mask_whatever_the_folder_is_called(tmp_path):
    for name in ("screw", "mine"):
        root = make_layout(tmp_path / name, missing_mask=True)
        with pytest.raises(ValueError, match=r"1 defective test images have no mask.*001_mask"):
            load_dataset(root)
        with pytest.raises(ValueError, match="--allow-missing-masks"):
            load_dataset(root)
        dataset = load_dataset(root, allow_missing_masks=True)
        assert sum(s.mask_path is None for s in dataset.test_samples) == 3


def test_good_is_matched_in_any_case_and_near_misses_are_warned(tmp_path):
    root = make_layout(tmp_path / "cat")
    (root / "test/good").rename(root / "test/Good")
    dataset = load_dataset(root)
    assert [s.label for s in dataset.test_samples if s.defect_type == "Good"] == [0, 0]
    assert dataset.defect_types == ["crack"]
    write_image(root / "test/goods/000.png")
    write_mask(root / "ground_truth/goods/000_mask.png")
    with pytest.warns(DatasetWarning, match="goods.*read as the defect type 'goods'"):
        dataset = load_dataset(root)
    assert [s.label for s in dataset.test_samples if s.defect_type == "goods"] == [1]


def test_tool_outputs_hidden_folders_and_empty_folders_are_not_data(tmp_path):
    root = make_layout(tmp_path / "cat")
    # predict --out written under test/: marked, so never a defect class
    write_image(root / "test/predictions/heatmaps/000.png")
    (root / "test/predictions" / OUTPUT_MARKER).write_text("")
    (root / "test/predictions/heatmaps" / OUTPUT_MARKER).write_text("")
    write_image(root / "ground_truth/.ipynb_checkpoints/000_mask-checkpoint.png")
    write_image(root / "test/.ipynb_checkpoints/000.png")
    (root / "test/empty").mkdir()
    with pytest.warns(DatasetWarning, match="ignoring .*empty: it holds no image files"):
        dataset = load_dataset(root)
    assert sorted({s.defect_type for s in dataset.test_samples}) == ["crack", "good"]
    assert image_paths([root / "test"], recursive=True) == [
        s.image_path for s in sorted(dataset.test_samples, key=lambda s: s.image_path)
    ]


def test_broken_links_are_warned_and_webp_is_an_image(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.webp")
    (folder / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    with pytest.warns(DatasetWarning, match="dangling.png: a broken link"):
        assert image_paths([folder]) == [folder / "a.webp"]
    with pytest.raises(FileNotFoundError, match="loop.png is a broken link or a link loop"):
        image_paths([folder / "loop.png"])


def test_training_images_are_read_without_test_or_ground_truth_folders(tmp_path):
    root = tmp_path / "cat"
    write_image(root / "train/good/a.png")
    write_image(root / "ground_truth/.ipynb_checkpoints/x.png")
    assert load_train_paths(root) == [root / "train/good/a.png"]
    plain = tmp_path / "plain"
    write_image(plain / "b.png")
    write_image(plain / "a.jpg")
    assert load_train_paths(plain) == [plain / "a.jpg", plain / "b.png"]
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_train_paths(tmp_path / "cat" / "ground_truth")


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


@pytest.mark.shared_data
def test_demo_category_gives_the_complete_categorys_model_inputs():
    """data/mvtec_ad_demo/bottle (shipped) preprocesses to exactly the original files' inputs."""
    from fixture_data import DEMO_BOTTLE, FULL_BOTTLE

    from patchcore_jax.preprocess import load_image, load_masks

    demo = load_dataset(DEMO_BOTTLE)
    full = load_dataset(FULL_BOTTLE)
    assert len(demo.train_paths) == 70 and len(demo.test_samples) == len(full.test_samples) == 83
    assert [s.image_path.relative_to(DEMO_BOTTLE) for s in demo.test_samples] == [
        s.image_path.relative_to(FULL_BOTTLE) for s in full.test_samples
    ]
    for demo_path in [*demo.train_paths[::7], *demo.test_image_paths[::5]]:
        original = FULL_BOTTLE / demo_path.relative_to(DEMO_BOTTLE)
        np.testing.assert_array_equal(load_image(demo_path), load_image(original))
    np.testing.assert_array_equal(
        load_masks(demo.test_mask_paths, image_paths=demo.test_image_paths),
        load_masks(full.test_mask_paths, image_paths=full.test_image_paths),
    )


@pytest.mark.shared_data
def test_repository_fixtures_are_the_shared_ones():
    """Every shared fixture is in the repository, byte for byte; every other file there is
    written by a generator committed beside it (tests/fixtures/make_*.py, torchvision-made)."""
    import hashlib

    from fixture_data import FIXTURES, SHARED

    shared = sorted(p.name for p in (SHARED / "fixtures").iterdir())
    generators = sorted(FIXTURES.glob("make_*.py"))
    sources = "".join(path.read_text() for path in generators)
    ours = {p.name for p in FIXTURES.iterdir() if p.is_file() and p not in generators}
    assert set(shared) <= ours
    for name in sorted(ours - set(shared)):  # e.g. torchvision_tiny_resnext_io.npz
        assert name.split(".")[0].removesuffix("_io") in sources, name
    for name in shared:
        digest = [
            hashlib.sha256((d / name).read_bytes()).digest()
            for d in (FIXTURES, SHARED / "fixtures")
        ]
        assert digest[0] == digest[1], name


def test_few_shot_subset_is_seeded_sorted_and_independent_of_input_order(tmp_path):
    from patchcore_jax.datasets.folders import few_shot_subset

    paths = [tmp_path / f"{i:03d}.png" for i in range(20)]
    chosen = few_shot_subset(paths, 5, seed=7)
    assert chosen == few_shot_subset(list(reversed(paths)), 5, seed=7)  # same subset every run
    assert chosen == sorted(chosen) and len(set(chosen)) == 5
    positions = sorted(np.random.default_rng(7).choice(20, size=5, replace=False).tolist())
    assert chosen == [paths[i] for i in positions]  # the documented draw
    assert few_shot_subset(paths, 5, seed=8) != chosen
    assert few_shot_subset(paths, 20, seed=0) == paths
    with pytest.raises(ValueError, match="21 training images requested .* only 20 exist"):
        few_shot_subset(paths, 21)
    with pytest.raises(ValueError, match=">= 1"):
        few_shot_subset(paths, 0)


def test_a_gif_or_text_file_in_an_image_folder_is_skipped_with_the_broken_link_warning(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png")
    write_image(folder / "b.gif")
    (folder / "notes.txt").write_text("not an image")
    (folder / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (folder / ".DS_Store").write_text("hidden: ignored silently")
    with pytest.warns(DatasetWarning) as caught:
        assert image_paths([folder]) == [folder / "a.png"]
    (message,) = [str(w.message) for w in caught]  # one warning for the folder, naming each
    assert message.startswith(f"skipping 3 files in {folder}: ")
    assert f"{folder / 'b.gif'}: not an image file" in message
    assert f"{folder / 'dangling.png'}: a broken link" in message and ".DS_Store" not in message
    (folder / "dangling.png").unlink()
    (folder / "notes.txt").unlink()
    with pytest.warns(DatasetWarning, match=r"^skipping .*b\.gif: not an image file \(\.png, "):
        load_train_paths(folder)


def test_validation_folder_errors_speak_of_the_validation_folder_not_training_or_eval_options(
    tmp_path,
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "no_good/train/good").mkdir(parents=True)
    root = make_layout(tmp_path / "unmasked", missing_mask=True)
    for folder, reason in [
        (empty, f"validation folder {empty} holds no images"),
        (tmp_path / "no_good", "validation folder .*train/good contains no image files"),
        (root, "1 defective validation images have no mask .*crack/001.bmp.*ground_truth"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_validation_folder(folder)
        message = str(info.value)
        assert re.search(reason, message), message
        assert "training" not in message and "--allow-missing-masks" not in message
    good = make_layout(tmp_path / "good")
    labelled = load_validation_folder(good)
    assert labelled.train_paths == () and [s.label for s in labelled.test_samples] == [1, 1, 0, 0]
    plain = load_validation_folder(good / "train/good")
    assert plain.test_samples == () and [p.name for p in plain.train_paths] == ["a.png", "b.png"]


def test_same_files_compares_resolved_paths(tmp_path):
    image = write_image(tmp_path / "a" / "x.png")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "y.png").symlink_to(image)
    other = write_image(tmp_path / "a" / "z.png")
    second = [tmp_path / "links" / "y.png", other, tmp_path / "a" / ".." / "a" / "x.png"]
    assert same_files([image], second) == [second[0], second[2]]
