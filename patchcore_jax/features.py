"""Locally aware patch features (the paper's Sec. 3.1), on the device.

For every ``patch_stride``-th position (1: every one) of each layer's feature map the reference
PatchCore code takes the zero-padded ``patch_size`` x ``patch_size`` neighbourhood, brings later
layers' patch grids onto the first (reference) layer's by bilinear interpolation
(``align_corners=False``), flattens each layer's ``(C, p, p)`` block channel-major, reduces it
to ``pretrain_embed_dimension`` values with PyTorch's ``adaptive_avg_pool1d``, stacks the layers
and pools the concatenation to ``target_embed_dimension``.

Every step is linear, and pooling (over features) commutes with resizing (over positions), so each
layer is pooled on its own, smaller grid before it is resized. Resizing is two small static
interpolation matrices. For the default configuration the whole pipeline collapses to a closed
form (a 3x3 smoothing of layer2 and a pair-averaged 3x3 box mean of layer3, upsampled), which
``patch_features`` uses automatically.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax.sharding import HIGHEST


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix ``R: [out_size, in_size] float32`` with ``R @ x`` == torch bilinear resize of ``x``.

    Exact ``F.interpolate(mode="bilinear", align_corners=False)`` semantics along one axis (no
    antialiasing): source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0, neighbours
    ``floor(src)`` and ``min(floor(src) + 1, in - 1)``. Valid for up- and downsampling.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"in_size and out_size must be positive, got {in_size}, {out_size}")
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    upper_weight = source - lower
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
    np.add.at(matrix, (rows, upper), upper_weight)
    return matrix.astype(np.float32)


def _pool_index_table(length: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Static gather table of adaptive_avg_pool1d: indices and weights, both [output_size, W]."""
    outputs = np.arange(output_size)
    starts = (outputs * length) // output_size
    ends = -((-(outputs + 1) * length) // output_size)  # ceil((i + 1) * L / O)
    counts = ends - starts
    window = int(counts.max())
    offsets = np.arange(window)
    indices = np.minimum(starts[:, None] + offsets[None, :], length - 1)
    weights = np.where(offsets[None, :] < counts[:, None], 1.0 / counts[:, None], 0.0)
    return indices.astype(np.int32), weights.astype(np.float32)


def adaptive_avg_pool1d(values: jax.Array, output_size: int) -> jax.Array:
    """PyTorch ``adaptive_avg_pool1d`` over the last axis: ``[..., L] -> [..., output_size]``.

    Output ``i`` is the mean of inputs ``[floor(i L / O), ceil((i + 1) L / O))``. Regular windows
    are a reshape and a mean; irregular ones a gather with a static index table (no dense
    ``L x O`` matrix).
    """
    length = values.shape[-1]
    if output_size < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if length % output_size == 0:
        pooled = values.reshape(*values.shape[:-1], output_size, length // output_size)
        return pooled.mean(axis=-1)
    indices, weights = _pool_index_table(length, output_size)
    return jnp.sum(values[..., indices] * weights, axis=-1)


def _resize_grid(maps: jax.Array, out_height: int, out_width: int) -> jax.Array:
    """Bilinear resize (torch, align_corners=False): ``[B, h, w, C] -> [B, H, W, C]``."""
    _, height, width, _ = maps.shape
    if (height, width) == (out_height, out_width):
        return maps
    rows = jnp.asarray(bilinear_resize_matrix(height, out_height))
    cols = jnp.asarray(bilinear_resize_matrix(width, out_width))
    maps = jnp.einsum("Hh,bhwc->bHwc", rows, maps, precision=HIGHEST)
    return jnp.einsum("Ww,bhwc->bhWc", cols, maps, precision=HIGHEST)


def patch_grid_size(size: int, patch_size: int, patch_stride: int = 1) -> int:
    """Positions along one axis of torch ``Unfold(patch_size, stride=patch_stride,
    padding=(patch_size - 1) // 2)``: ``floor((size + 2 pad - patch_size) / stride) + 1``."""
    return (size + 2 * ((patch_size - 1) // 2) - patch_size) // patch_stride + 1


def _unfold(maps: jax.Array, patch_size: int, patch_stride: int) -> jax.Array:
    """``[B, h, w, C] -> [B, n_h, n_w, C * p * p]``: zero-padded neighbourhoods every
    ``patch_stride`` positions, channel-major."""
    batch, height, width, channels = maps.shape
    padding = (patch_size - 1) // 2
    padded = jnp.pad(maps, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = patch_grid_size(height, patch_size, patch_stride)
    cols = patch_grid_size(width, patch_size, patch_stride)
    last_row, last_col = (rows - 1) * patch_stride + 1, (cols - 1) * patch_stride + 1
    shifted = [
        padded[:, dy : dy + last_row : patch_stride, dx : dx + last_col : patch_stride, :]
        for dy in range(patch_size)
        for dx in range(patch_size)
    ]
    return jnp.stack(shifted, axis=-1).reshape(batch, rows, cols, channels * patch_size**2)


@functools.partial(
    jax.jit,
    static_argnames=(
        "pretrain_embed_dimension",
        "target_embed_dimension",
        "patch_size",
        "patch_stride",
    ),
)
def _patch_features_general(
    feature_maps: tuple[jax.Array, ...],
    pretrain_embed_dimension: int,
    target_embed_dimension: int,
    patch_size: int,
    patch_stride: int = 1,
) -> jax.Array:
    """Any layers, dimensions and stride; ``feature_maps[i]: [B, h_i, w_i, C_i]``. Every
    layer's patch grid is resized onto the first layer's, as the reference does."""
    batch, height, width, _ = feature_maps[0].shape
    rows = patch_grid_size(height, patch_size, patch_stride)
    cols = patch_grid_size(width, patch_size, patch_stride)
    per_layer = []
    for maps in feature_maps:
        unfolded = _unfold(maps, patch_size, patch_stride)
        pooled = adaptive_avg_pool1d(unfolded, pretrain_embed_dimension)
        per_layer.append(_resize_grid(pooled, rows, cols))
    stacked = jnp.concatenate(per_layer, axis=-1)  # layer-major, as torch.stack + reshape
    features = adaptive_avg_pool1d(stacked, target_embed_dimension)
    return features.reshape(batch, rows * cols, target_embed_dimension)


def _box_sum_3x3(maps: jax.Array) -> jax.Array:
    """Zero-padded 3x3 box sum over the grid of ``maps: [B, h, w, C]`` (separable)."""
    height, width = maps.shape[1:3]
    padded = jnp.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = padded[:, 0:height] + padded[:, 1 : height + 1] + padded[:, 2 : height + 2]
    return rows[:, :, 0:width] + rows[:, :, 1 : width + 1] + rows[:, :, 2 : width + 2]


@jax.jit
def _patch_features_default(layer2: jax.Array, layer3: jax.Array) -> jax.Array:
    """Closed form of the patch features for 512 + 1024 channels, dims 1024/1024, patch 3.

    ``layer2: [B, h, w, 512]``, ``layer3: [B, h3, w3, 1024]`` -> ``[B, h * w, 1024]``.
    Dims 0..511: layer2 smoothed with 0.2 at the centre and 0.1 on the 8 neighbours. Dims
    512..1023: the 3x3 mean of layer3 channel pairs (2k, 2k+1), upsampled to layer2's grid.
    """
    batch, height, width, _ = layer2.shape
    smoothed = 0.1 * (_box_sum_3x3(layer2) + layer2)
    pairs = layer3.reshape(*layer3.shape[:3], 512, 2).mean(axis=-1)
    box_mean = _box_sum_3x3(pairs) / 9.0
    upsampled = _resize_grid(box_mean, height, width)
    features = jnp.concatenate([smoothed, upsampled], axis=-1)
    return features.reshape(batch, height * width, 1024)


def patch_features(
    feature_maps: Sequence[jax.Array],
    pretrain_embed_dimension: int = 1024,
    target_embed_dimension: int = 1024,
    patch_size: int = 3,
    patch_stride: int = 1,
) -> jax.Array:
    """Locally aware patch features of a batch of images (the paper's Sec. 3.1).

    Args:
      feature_maps: backbone outputs, each ``[B, h_i, w_i, C_i] float32`` (NHWC); the first sets
        the patch grid (e.g. layer2), later ones are bilinearly resized onto it.
      pretrain_embed_dimension: per-layer length after adaptive average pooling.
      target_embed_dimension: final patch feature length.
      patch_size: side of the zero-padded neighbourhood aggregated around each position.
      patch_stride: s of the paper's Eq. 3 (the authors' ``patchstride``): a neighbourhood every
        s positions of each layer's grid; every layer's patch grid is then resized onto the
        first layer's.

    Returns:
      ``[B, n_h * n_w, target_embed_dimension] float32``, patches row-major per image, where
      ``n = patch_grid_size(h_0, patch_size, patch_stride)`` (``h_0`` for odd ``patch_size``
      and stride 1).
    """
    feature_maps = tuple(jnp.asarray(maps, jnp.float32) for maps in feature_maps)
    if not feature_maps:
        raise ValueError("feature_maps must hold at least one [B, h, w, C] array")
    for index, maps in enumerate(feature_maps):
        if maps.ndim != 4 or maps.shape[0] != feature_maps[0].shape[0]:
            raise ValueError(
                f"feature_maps[{index}] must be [B, h, w, C] with B={feature_maps[0].shape[0]}, "
                f"got shape {maps.shape}"
            )
    for name, value in (
        ("pretrain_embed_dimension", pretrain_embed_dimension),
        ("target_embed_dimension", target_embed_dimension),
        ("patch_size", patch_size),
        ("patch_stride", patch_stride),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for index, maps in enumerate(feature_maps):
        if min(patch_grid_size(size, patch_size) for size in maps.shape[1:3]) < 1:
            raise ValueError(
                f"feature_maps[{index}] grid {maps.shape[1:3]} is too small for "
                f"patch_size={patch_size}"
            )
    channels = tuple(maps.shape[-1] for maps in feature_maps)
    dims = (pretrain_embed_dimension, target_embed_dimension, patch_size, patch_stride)
    if (channels, *dims) == ((512, 1024), 1024, 1024, 3, 1):
        return _patch_features_default(*feature_maps)
    return _patch_features_general(feature_maps, *dims)


def embed_images(
    module: Any,
    variables: Any,
    images: jax.Array,
    *,
    pretrain_embed_dimension: int,
    target_embed_dimension: int,
    patch_size: int,
    patch_stride: int = 1,
    precision: str = "exact",
) -> jax.Array:
    """Backbone + locally aware patch features, one pure function.

    Args:
      module: the backbone's Flax module (returns a dict of stage outputs, first = finest grid).
      variables: its variables.
      images: [B, H, W, 3] uint8 (or float 0..255) RGB.
      patch_stride: s of Eq. 3 (``patch_features``).
      precision: ``exact`` (float32) or ``fast``: the backbone runs in bfloat16 (variables cast
        by ``backbone_variables``, here if not yet, and the normalised input), and its stage
        outputs are cast back to float32; the patch features are float32 either way.
    Returns:
      [B, h * w, target_embed_dimension] float32 patch features on the first (finest) stage's
      patch grid (``grid_shape``).
    """
    if precision == "exact":
        stage_outputs = module.apply(variables, images)
    elif precision == "fast":
        normalized = module.apply({}, images, method="normalize_input")
        stage_outputs = module.apply(
            backbone_variables(variables, precision),
            normalized.astype(jnp.bfloat16),
            method="forward_normalized",
        )
        stage_outputs = {name: x.astype(jnp.float32) for name, x in stage_outputs.items()}
    else:
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    return patch_features(
        list(stage_outputs.values()),
        pretrain_embed_dimension=pretrain_embed_dimension,
        target_embed_dimension=target_embed_dimension,
        patch_size=patch_size,
        patch_stride=patch_stride,
    )


def backbone_variables(variables: Any, precision: str) -> Any:
    """The backbone variables ``embed_images`` runs with: unchanged for ``exact``, floating
    leaves cast to bfloat16 for ``fast``."""
    if precision == "exact":
        return variables

    def cast(leaf: Any) -> Any:
        return leaf.astype(jnp.bfloat16) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, variables)


def grid_shape(
    module: Any,
    variables: Any,
    image_shape: tuple[int, int],
    patch_size: int,
    patch_stride: int = 1,
) -> tuple[int, int]:
    """(h, w) of the patch grid of the backbone ``module`` for images of ``image_shape``: its
    finest stage's output grid, every ``patch_stride``-th position (``patch_grid_size``); warns
    about stages whose grid is smaller than the patch neighbourhood (their features are mostly
    zero padding)."""
    stage_shapes = jax.eval_shape(
        module.apply,
        variables,
        jax.ShapeDtypeStruct((1, *image_shape, 3), jnp.uint8),
    )
    for stage, shape in stage_shapes.items():
        if min(shape.shape[1:3]) < patch_size:
            warnings.warn(
                f"image size {image_shape[0]}x{image_shape[1]} gives a "
                f"{shape.shape[1]}x{shape.shape[2]} grid at {stage}, smaller than the "
                f"{patch_size}x{patch_size} patch neighbourhood: its features "
                "are mostly zero padding; use larger images",
                stacklevel=3,
            )
    _, height, width, _ = next(iter(stage_shapes.values())).shape
    return (
        patch_grid_size(height, patch_size, patch_stride),
        patch_grid_size(width, patch_size, patch_stride),
    )
