"""TensorFlow Datasets readers (optional extra ``patchcore-jax[tfds]``; TensorFlow is imported
only when a ``tf.data.Dataset`` is read).

Images (and masks) are resized and cropped exactly as ``preprocess.load_image`` does from a file,
so a TFDS dataset built from a folder (``datasets/mvtec_ad``) gives the folder reader's batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from patchcore_jax import preprocess


def _tfds_examples(dataset, keys: Sequence[str]):
    """Examples of a ``tf.data.Dataset`` (e.g. ``tfds.load(...)``) or an iterable of dicts, as
    dicts of numpy arrays, one image each (batched datasets are unbatched); ``keys`` must be
    features of every example."""
    spec = getattr(dataset, "element_spec", None)
    if spec is not None:
        import tensorflow_datasets as tfds

        features = sorted(spec) if isinstance(spec, dict) else None
        missing = [key for key in keys if features is None or key not in features]
        if missing:
            raise ValueError(
                f"TFDS dataset has no {missing[0]!r} feature (its features: "
                f"{features if features is not None else type(spec).__name__}); pass the "
                "feature's name, and load without as_supervised"
            )
        dataset = tfds.as_numpy(dataset)
    for example in dataset:
        if not isinstance(example, dict) or any(key not in example for key in keys):
            found = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise ValueError(f"TFDS example lacks the features {list(keys)} (it has {found})")
        image = np.asarray(example[keys[0]])
        if image.ndim == 4:  # a batched dataset
            for index in range(image.shape[0]):
                yield {key: np.asarray(example[key])[index] for key in keys}
        else:
            yield {key: np.asarray(example[key]) for key in keys}


def tfds_image_batches(
    dataset,
    batch_size: int,
    resize: int = 256,
    crop: preprocess.Size = 224,
    *,
    resize_mode: str = "shorter-side",
    image_key: str = "image",
) -> Iterator[np.ndarray]:
    """The batches ``PatchCore.fit``/``predict`` take, from a TFDS dataset's images.

    Each image is resized and cropped exactly as ``preprocess.load_image`` does from a file, so
    a dataset built from a folder gives the folder reader's batches.

    Args:
      dataset: ``tfds.load(name, split=...)`` (a ``tf.data.Dataset`` of dicts) or any iterable
        of dicts holding ``image_key``: uint8 [H, W, 3] (or a batch of them).
    Yields:
      uint8 [<= batch_size, height, width, 3].
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch = []
    for example in _tfds_examples(dataset, (image_key,)):
        batch.append(
            preprocess.image_from_array(example[image_key], resize, crop, resize_mode=resize_mode)
        )
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def load_tfds_test_set(
    dataset,
    resize: int = 256,
    crop: preprocess.Size = 224,
    *,
    resize_mode: str = "shorter-side",
    image_key: str = "image",
    label_key: str = "label",
    mask_key: str | None = "mask",
    mask_threshold: int = preprocess.DEFAULT_MASK_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A labelled TFDS split for ``metrics.evaluate`` / ``PatchCore.calibrate``.

    Returns:
      (images uint8 [N, height, width, 3], labels [N] int64 (nonzero = defect),
      masks [N, height, width] bool, or None when ``mask_key`` is None).
    """
    keys = (image_key, label_key) + ((mask_key,) if mask_key is not None else ())
    images, labels, masks = [], [], []
    for example in _tfds_examples(dataset, keys):
        images.append(
            preprocess.image_from_array(example[image_key], resize, crop, resize_mode=resize_mode)
        )
        labels.append(int(example[label_key] != 0))
        if mask_key is not None:
            masks.append(
                preprocess.mask_from_array(
                    example[mask_key],
                    resize,
                    crop,
                    resize_mode=resize_mode,
                    threshold=mask_threshold,
                )
            )
    if not images:
        raise ValueError("TFDS dataset holds no examples")
    return (
        np.stack(images),
        np.array(labels, np.int64),
        np.stack(masks) if mask_key is not None else None,
    )
