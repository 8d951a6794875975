"""Patch features (features.py) against the reference fixture and an independent torch port."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as torch_f
from conftest import load_fixture
from numpy_aggregation import numpy_patch_features, rounding_bound

from patchcore_jax import features, sharding


def _nhwc(nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))


def _torch_reference_features(
    maps_nchw: list[np.ndarray], pretrain: int, target: int, patch_size: int
) -> np.ndarray:
    """The reference PatchCore ``_embed`` (PatchMaker, interpolation, MeanMapper, Aggregator)."""
    padding = int((patch_size - 1) / 2)
    layers, grids = [], []
    for maps in maps_nchw:
        x = torch.from_numpy(maps)
        unfolded = torch.nn.Unfold(kernel_size=patch_size, stride=1, padding=padding)(x)
        grids.append([s + 2 * padding - (patch_size - 1) for s in x.shape[-2:]])
        unfolded = unfolded.reshape(*x.shape[:2], patch_size, patch_size, -1)
        layers.append(unfolded.permute(0, 4, 1, 2, 3))
    reference_grid = grids[0]
    for i in range(1, len(layers)):
        layer = layers[i].reshape(layers[i].shape[0], *grids[i], *layers[i].shape[2:])
        layer = layer.permute(0, -3, -2, -1, 1, 2)
        base_shape = layer.shape
        layer = layer.reshape(-1, *layer.shape[-2:])
        layer = torch_f.interpolate(
            layer.unsqueeze(1), size=tuple(reference_grid), mode="bilinear", align_corners=False
        ).squeeze(1)
        layer = layer.reshape(*base_shape[:-2], *reference_grid).permute(0, -2, -1, 1, 2, 3)
        layers[i] = layer.reshape(len(layer), -1, *layer.shape[-3:])
    layers = [layer.reshape(-1, *layer.shape[-3:]) for layer in layers]
    pooled = [
        torch_f.adaptive_avg_pool1d(layer.reshape(len(layer), 1, -1), pretrain).squeeze(1)
        for layer in layers
    ]
    stacked = torch.stack(pooled, dim=1)
    out = torch_f.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target)
    return out.reshape(len(stacked), -1).numpy()


@pytest.mark.parametrize("group", ["embed_square", "embed_rect", "embed_d384"])
def test_reference_fixture(group):
    data = load_fixture("reference_parity", group)
    maps = [_nhwc(data["layer2_nchw"]), _nhwc(data["layer3_nchw"])]
    dims = int(data["pretrain_embed_dimension"]), int(data["target_embed_dimension"])
    expected = data["features"]
    automatic = np.asarray(features.patch_features(maps, *dims))
    general = np.asarray(features._patch_features_general(tuple(maps), *dims, 3))
    assert automatic.shape == (1, *expected.shape)
    np.testing.assert_allclose(automatic[0], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(general[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grids", [((9, 7), (5, 4)), ((6, 10), (3, 5)), ((5, 5), (7, 3))])
def test_default_fast_path_equals_general_path(grids):
    rng = np.random.default_rng(0)
    layer2 = rng.normal(size=(2, *grids[0], 512)).astype(np.float32)
    layer3 = rng.normal(size=(2, *grids[1], 1024)).astype(np.float32)
    fast = features._patch_features_default(jnp.asarray(layer2), jnp.asarray(layer3))
    general = features._patch_features_general((layer2, layer3), 1024, 1024, 3)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(general), rtol=0, atol=1e-5)
    assert fast.shape == (2, grids[0][0] * grids[0][1], 1024)


@pytest.mark.parametrize(
    "patch_size,pretrain,target,grids,channels",
    [
        (3, 13, 11, ((7, 9), (4, 5), (3, 2)), (6, 10, 7)),
        (5, 40, 24, ((6, 5), (3, 3)), (8, 12)),
        (2, 7, 16, ((5, 6), (8, 3)), (3, 5)),
        (1, 9, 9, ((4, 4),), (20,)),
    ],
)
def test_general_path_matches_torch_reference(patch_size, pretrain, target, grids, channels):
    rng = np.random.default_rng(1)
    maps_nchw = [
        rng.normal(size=(2, c, *grid)).astype(np.float32)
        for grid, c in zip(grids, channels, strict=True)
    ]
    expected = _torch_reference_features(maps_nchw, pretrain, target, patch_size)
    ours = features.patch_features([_nhwc(m) for m in maps_nchw], pretrain, target, patch_size)
    np.testing.assert_allclose(np.asarray(ours).reshape(expected.shape), expected, atol=1e-5)


@pytest.mark.parametrize("patch_stride", [1, 2, 3])
@pytest.mark.parametrize(
    "patch_size,pretrain,target,grids,channels",
    [
        (3, 20, 12, ((9, 7), (5, 4), (3, 2)), (4, 6, 5)),
        (5, 24, 16, ((8, 10), (4, 5)), (3, 4)),
        (1, 6, 6, ((7, 5),), (6,)),
    ],
)
def test_strided_patch_features_equal_the_numpy_aggregation(
    patch_stride, patch_size, pretrain, target, grids, channels
):
    """Eq. 3 with stride s: a neighbourhood every s positions of each layer, every layer's patch
    grid resized onto the first's; equal to the independent float64 computation within the
    derived float32 bound, on the grid floor((h + 2 pad - p) / s) + 1."""
    rng = np.random.default_rng(5)
    maps = [
        rng.normal(size=(2, *grid, c)).astype(np.float32)
        for grid, c in zip(grids, channels, strict=True)
    ]
    dims = (pretrain, target, patch_size, patch_stride)
    expected = numpy_patch_features(maps, *dims)
    ours = np.asarray(features.patch_features(maps, *dims), np.float64)
    pad = (patch_size - 1) // 2
    rows, cols = ((size + 2 * pad - patch_size) // patch_stride + 1 for size in grids[0])
    assert ours.shape == expected.shape == (2, rows * cols, target)
    assert (
        features.patch_grid_size(grids[0][0], patch_size, patch_stride),
        features.patch_grid_size(grids[0][1], patch_size, patch_stride),
    ) == (rows, cols)
    assert np.all(np.abs(ours - expected) <= rounding_bound(maps, *dims))


def test_stride_one_is_the_default_path_and_larger_strides_subsample_the_grid():
    """s = 1 computes what the closed form computes (bit for bit: it is the same program);
    s = 2 keeps every second neighbourhood of layer2 (the first layer's patch grid)."""
    rng = np.random.default_rng(6)
    layer2 = rng.normal(size=(1, 9, 8, 512)).astype(np.float32)
    layer3 = rng.normal(size=(1, 5, 4, 1024)).astype(np.float32)
    default = np.asarray(features.patch_features([layer2, layer3]))
    explicit = np.asarray(features.patch_features([layer2, layer3], 1024, 1024, 3, 1))
    np.testing.assert_array_equal(explicit, default)
    strided = features.patch_features([layer2, layer3], 1024, 1024, 3, 2)
    assert strided.shape == (1, 5 * 4, 1024)
    dims = (1024, 1024, 3, 2)
    expected = numpy_patch_features([layer2, layer3], *dims)
    bound = rounding_bound([layer2, layer3], *dims)
    assert np.all(np.abs(np.asarray(strided, np.float64) - expected) <= bound)


@pytest.mark.parametrize(
    "length,output_size",
    [(9216, 1024), (4608, 1024), (2048, 384), (10, 3), (17, 5), (5, 8), (7, 7)],
)
def test_adaptive_avg_pool1d_matches_torch(length, output_size):
    values = np.random.default_rng(2).normal(size=(3, length)).astype(np.float32)
    expected = torch_f.adaptive_avg_pool1d(torch.from_numpy(values)[:, None], output_size)[:, 0]
    ours = features.adaptive_avg_pool1d(jnp.asarray(values), output_size)
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "in_size,out_size", [(14, 28), (10, 28), (7, 3), (28, 13), (5, 5), (1, 4), (4, 1), (3, 224)]
)
def test_bilinear_resize_matrix_matches_torch_interpolate(in_size, out_size):
    image = np.random.default_rng(3).normal(size=(1, 2, in_size, in_size + 2)).astype(np.float32)
    expected = torch_f.interpolate(
        torch.from_numpy(image),
        size=(out_size, out_size + 1),
        mode="bilinear",
        align_corners=False,
    ).numpy()
    rows = features.bilinear_resize_matrix(in_size, out_size)
    cols = features.bilinear_resize_matrix(in_size + 2, out_size + 1)
    assert rows.shape == (out_size, in_size)
    ours = np.einsum("Hh,bchw,Ww->bcHW", rows, image, cols)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_batch_sharded_over_all_devices_equals_unsharded():
    mesh = sharding.make_mesh(bank_shards=2)
    rng = np.random.default_rng(4)
    layer2 = rng.normal(size=(8, 6, 6, 512)).astype(np.float32)
    layer3 = rng.normal(size=(8, 3, 3, 1024)).astype(np.float32)
    expected = np.asarray(features.patch_features([layer2, layer3]))
    row_sharding = sharding.row_sharding(mesh)
    sharded = features.patch_features(
        [jax.device_put(layer2, row_sharding), jax.device_put(layer3, row_sharding)]
    )
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), expected, rtol=0, atol=1e-6)
    general = features.patch_features(
        [jax.device_put(layer2, row_sharding)],
        pretrain_embed_dimension=64,
        target_embed_dimension=32,
    )
    expected_general = features.patch_features([layer2], 64, 32)
    np.testing.assert_allclose(np.asarray(general), np.asarray(expected_general), atol=1e-6)


def test_bad_input_raises():
    maps = np.zeros((1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="feature_maps"):
        features.patch_features([])
    with pytest.raises(ValueError, match=r"feature_maps\[1\]"):
        features.patch_features([maps, np.zeros((2, 4, 4, 8), np.float32)])
    with pytest.raises(ValueError, match="target_embed_dimension"):
        features.patch_features([maps], 8, 0)
    with pytest.raises(ValueError, match="too small"):
        features.patch_features([np.zeros((1, 1, 4, 8), np.float32)], 8, 8, patch_size=4)
    with pytest.raises(ValueError, match="patch_stride must be a positive integer, got 0"):
        features.patch_features([maps], 8, 8, patch_stride=0)
