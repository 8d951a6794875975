"""The authors' patch aggregation (``PatchMaker.patchify`` with a stride, the bilinear alignment
of every layer's patch grid to the first layer's, ``MeanMapper``, ``Aggregator``) written out
again in float64 numpy, loop by loop, in the reference's order (resize, then pool): an
independent check of ``features.patch_features``, and a float32 rounding bound for it.

Used by tests/test_features.py and tests/test_resnet.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from float_rounding import gamma


def _unfold(maps: np.ndarray, patch_size: int, patch_stride: int) -> np.ndarray:
    """``[B, h, w, C] -> [B, n_h, n_w, C * p * p]``: torch ``Unfold(p, stride=s,
    padding=(p - 1) // 2)`` per position, each block flattened channel-major."""
    batch, height, width, channels = maps.shape
    pad = (patch_size - 1) // 2
    padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels))
    padded[:, pad : pad + height, pad : pad + width] = maps
    rows = (height + 2 * pad - patch_size) // patch_stride + 1
    cols = (width + 2 * pad - patch_size) // patch_stride + 1
    out = np.empty((batch, rows, cols, channels * patch_size**2))
    for i in range(rows):
        for j in range(cols):
            top, left = i * patch_stride, j * patch_stride
            block = padded[:, top : top + patch_size, left : left + patch_size, :]
            out[:, i, j] = block.transpose(0, 3, 1, 2).reshape(batch, -1)
    return out


def _bilinear_axis(values: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """torch ``interpolate(mode="bilinear", align_corners=False)`` along one axis: output ``o``
    reads source ``max((o + 0.5) in / out - 0.5, 0)`` between its two neighbours."""
    in_size = values.shape[axis]
    values = np.moveaxis(values, axis, 0)
    out = np.empty((out_size, *values.shape[1:]))
    for o in range(out_size):
        source = max((o + 0.5) * in_size / out_size - 0.5, 0.0)
        lower = int(np.floor(source))
        upper = min(lower + 1, in_size - 1)
        weight = source - lower
        out[o] = (1 - weight) * values[lower] + weight * values[upper]
    return np.moveaxis(out, 0, axis)


def _adaptive_mean(values: np.ndarray, output_size: int) -> np.ndarray:
    """torch ``adaptive_avg_pool1d`` over the last axis: output ``i`` is the mean of inputs
    ``[floor(i L / O), ceil((i + 1) L / O))``."""
    length = values.shape[-1]
    out = np.empty((*values.shape[:-1], output_size))
    for i in range(output_size):
        start, end = (i * length) // output_size, -((-(i + 1) * length) // output_size)
        out[..., i] = values[..., start:end].mean(axis=-1)
    return out


def numpy_patch_features(
    maps: Sequence[np.ndarray],
    pretrain_embed_dimension: int,
    target_embed_dimension: int,
    patch_size: int = 3,
    patch_stride: int = 1,
) -> np.ndarray:
    """``maps[i]: [B, h_i, w_i, C_i]`` (NHWC) -> ``[B, n_h * n_w, target]`` float64 on the
    first layer's patch grid, computed as the authors' ``_embed`` does."""
    layers = [_unfold(np.asarray(x, np.float64), patch_size, patch_stride) for x in maps]
    batch, rows, cols, _ = layers[0].shape
    aligned = [layers[0]]
    for layer in layers[1:]:
        aligned.append(_bilinear_axis(_bilinear_axis(layer, rows, 1), cols, 2))
    pooled = [_adaptive_mean(layer, pretrain_embed_dimension) for layer in aligned]
    stacked = np.concatenate(pooled, axis=-1)  # layer-major, as torch.stack(dim=1) + reshape
    return _adaptive_mean(stacked, target_embed_dimension).reshape(batch, rows * cols, -1)


def rounding_bound(
    maps: Sequence[np.ndarray],
    pretrain_embed_dimension: int,
    target_embed_dimension: int,
    patch_size: int = 3,
    patch_stride: int = 1,
) -> np.ndarray:
    """Bound on |float32 ``patch_features`` - exact| per output, whatever the summation order.

    Every stage (unfold: a copy; bilinear rows and columns: 2 terms each; the two pools:
    windows of at most ``ceil(L / O) + 1`` terms) is a linear map with non-negative weights
    summing to 1, so the whole aggregation is one such map ``A``. A float32 stage of ``n``
    terms with float32-rounded weights errs by at most ``gamma_{n+2}`` times the stage applied
    to the absolute values; later stages do not enlarge it (their rows sum to 1), so the total
    is at most ``gamma_N A|x|`` with N the sum over stages (gamma is superadditive).
    """
    layer_lengths = [x.shape[-1] * patch_size**2 for x in maps]
    first_window = max(-(-length // pretrain_embed_dimension) + 1 for length in layer_lengths)
    stacked = len(maps) * pretrain_embed_dimension
    second_window = -(-stacked // target_embed_dimension) + 1
    num_terms = (first_window + 2) + (second_window + 2) + 2 * (2 + 2)
    absolute = [np.abs(np.asarray(x, np.float64)) for x in maps]
    dims = (pretrain_embed_dimension, target_embed_dimension, patch_size, patch_stride)
    return gamma(num_terms) * numpy_patch_features(absolute, *dims)
