"""TFDS: `tfds build` of an MVTec-layout bottle subset; `fit` from `tfds.load` batches equals the
folder reader's bank; the test split equals the folder reader's; bad input is one clear error."""

import numpy as np
import pytest
from conftest import BOTTLE

from patchcore_jax import PatchCore, PatchCoreConfig, preprocess
from patchcore_jax.datasets.folders import load_dataset, load_train_paths
from patchcore_jax.datasets.tfds import load_tfds_test_set, tfds_image_batches

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(subset folder, tfds data dir): `tfds build` of 6 train, 2 good and 2 defect images."""
    root = tmp_path_factory.mktemp("tfds") / "manual" / "bottle"
    links = sorted((BOTTLE / "train/good").glob("*.png"))[:6]
    links += sorted((BOTTLE / "test/good").glob("*.png"))[:2]
    for defect in ("broken_large", "contamination"):
        image = sorted((BOTTLE / "test" / defect).glob("*.png"))[1]
        links += [image, BOTTLE / "ground_truth" / defect / f"{image.stem}_mask.png"]
    for source in links:
        target = root / source.relative_to(BOTTLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    data_dir = root.parents[1] / "tensorflow_datasets"
    # What `tfds build patchcore_jax/datasets/mvtec_ad --config bottle --manual_dir ...` runs
    # (tfds 4.9.10's command line also imports apache_beam, which the extra leaves out).
    import patchcore_jax.datasets.mvtec_ad.mvtec_ad_dataset_builder  # noqa: F401 (registers)

    builder = tfds.builder("mvtec_ad/bottle", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root.parent)
    )
    return root, data_dir


def test_fit_from_tfds_load_gives_the_folder_readers_bank(built):
    root, data_dir = built
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05)
    train = tfds.load("mvtec_ad/bottle", split="train", data_dir=data_dir)
    from_tfds = PatchCore(config).fit(tfds_image_batches(train, 4, config.resize, config.crop))
    paths = load_train_paths(root)
    from_folder = PatchCore(config, backbone=from_tfds.backbone).fit(
        preprocess.iter_image_batches(paths, 4, config.resize, config.crop)
    )
    np.testing.assert_array_equal(
        np.asarray(from_tfds.memory_bank), np.asarray(from_folder.memory_bank)
    )
    assert from_tfds.calibration.to_dict() == from_folder.calibration.to_dict()


def test_tfds_test_split_has_the_folder_readers_images_labels_and_masks(built):
    root, data_dir = built
    test = tfds.load("mvtec_ad/bottle", split="test", data_dir=data_dir)
    images, labels, masks = load_tfds_test_set(test)
    dataset = load_dataset(root)
    np.testing.assert_array_equal(labels, dataset.test_labels)
    np.testing.assert_array_equal(images, preprocess.load_images(dataset.test_image_paths))
    expected = preprocess.load_masks(dataset.test_mask_paths, image_paths=dataset.test_image_paths)
    np.testing.assert_array_equal(masks, expected)
    assert masks[labels == 1].any() and not masks[labels == 0].any()


def test_a_tfds_dataset_without_an_image_feature_is_one_clear_error(built):
    _, data_dir = built
    supervised = tfds.load("mvtec_ad/bottle", split="train", data_dir=data_dir, as_supervised=True)
    with pytest.raises(ValueError, match="no 'image' feature"):
        next(tfds_image_batches(supervised, 2))
    train = tfds.load("mvtec_ad/bottle", split="train", data_dir=data_dir)
    with pytest.raises(ValueError, match="no 'picture' feature .*'image'"):
        next(tfds_image_batches(train, 2, image_key="picture"))
