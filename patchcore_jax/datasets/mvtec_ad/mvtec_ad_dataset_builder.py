"""TFDS builder for MVTec AD-layout folders, so JAX users get the standard ``tfds.load`` workflow.

Build a category from a manual dir holding ``<category>/{train,test,ground_truth}`` (the MVTec AD
download) or a single category folder::

    tfds build patchcore_jax/datasets/mvtec_ad --config bottle --manual_dir DATA/mvtec_ad

    import patchcore_jax.datasets.mvtec_ad.mvtec_ad_dataset_builder  # registers "mvtec_ad"
    train = tfds.load("mvtec_ad/bottle", split="train")

Examples: ``image`` (full resolution, decoded like ``preprocess.load_image``), ``mask`` (0/255,
zeros for good images), ``label`` (0 good, 1 defect), ``defect_type`` and ``filename``. The order
is the folder reader's (sorted), not shuffled, so fits from either give the same bank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from patchcore_jax import preprocess
from patchcore_jax.datasets import folders


class Builder(tfds.core.GeneratorBasedBuilder):
    """MVTec AD layout: train split (good images) and test split (labelled, with masks)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in folders.MVTEC_AD_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and "
        "pass its folder (holding <category>/train, test, ground_truth) as --manual_dir, or a "
        "single category folder in that layout."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=["good", "defect"]),
                    "defect_type": tfds.features.Text(),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            disable_shuffling=True,  # the folder reader's order, so banks match
        )

    def _category_root(self, manual_dir: Path) -> Path:
        for root in (manual_dir / self.builder_config.name, manual_dir):
            if (root / "train").is_dir():
                return root
        raise FileNotFoundError(
            f"manual dir {manual_dir} holds neither {self.builder_config.name}/train nor train/"
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        dataset = folders.load_dataset(self._category_root(Path(dl_manager.manual_dir)))
        train = [folders.Sample(path, 0, folders.GOOD, None) for path in dataset.train_paths]
        return {
            "train": self._generate_examples(train, dataset.root),
            "test": self._generate_examples(list(dataset.test_samples), dataset.root),
        }

    def _generate_examples(self, samples: list[folders.Sample], root: Path):
        for sample in samples:
            image = preprocess.decode_image(sample.image_path)
            if sample.mask_path is None:
                mask = np.zeros((*image.shape[:2], 1), np.uint8)
            else:
                mask = preprocess.decode_mask(sample.mask_path)[:, :, None]
            key = sample.image_path.relative_to(root).as_posix()
            yield (
                key,
                {
                    "image": image,
                    "mask": mask,
                    "label": sample.label,
                    "defect_type": sample.defect_type,
                    "filename": key,
                },
            )
