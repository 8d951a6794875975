"""ResNet backbones: torchvision parity on the tiny fixture, layouts, and early stopping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture
from numpy_aggregation import numpy_patch_features, rounding_bound
from safetensors.numpy import load_file

from patchcore_jax import features
from patchcore_jax.backbones import (
    available_backbones,
    default_layers,
    init_backbone,
    load_backbone,
    probe_batch_norm,
)
from patchcore_jax.backbones.convert import (
    _flatten,
    read_state_dict,
    resnet_variables_from_state_dict,
    torch_key,
    variable_shapes,
)
from patchcore_jax.backbones.resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET_STAGES,
    Bottleneck,
    ResNet,
    probe_batch_stats,
    resnet,
)

TINY_STATE_DICT = FIXTURES / "torchvision_tiny_resnet.safetensors"


def tiny_resnet(layers=RESNET_STAGES) -> ResNet:
    """The fixture's ``ResNet(Bottleneck, [1, 2, 1, 1], width_per_group=16, num_classes=10)``."""
    return ResNet(Bottleneck, (1, 2, 1, 1), width_per_group=16, num_classes=10, layers=layers)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def assert_matches_torchvision(variables) -> None:
    io = load_fixture("torchvision_tiny_resnet_io")
    images = jnp.asarray(io["input_nchw"].transpose(0, 2, 3, 1))
    outputs = tiny_resnet().apply(variables, images, method=ResNet.forward_normalized)
    assert list(outputs) == list(RESNET_STAGES)
    for name in RESNET_STAGES[:-1]:
        reference = io[f"{name}_nchw"].transpose(0, 2, 3, 1)
        assert outputs[name].shape == reference.shape
        assert relative_error(outputs[name], reference) < 1e-4, name
    assert relative_error(outputs["logits"], io["logits"]) < 1e-4


def test_tiny_resnet_matches_torchvision_from_safetensors():
    state_dict = load_file(str(TINY_STATE_DICT))
    assert_matches_torchvision(resnet_variables_from_state_dict(state_dict, tiny_resnet()))


def test_tiny_resnet_matches_torchvision_from_pth(tmp_path):
    torch = pytest.importorskip("torch")  # installed here and in CI (the torch extra)
    path = tmp_path / "tiny.pth"
    torch.save(
        {key: torch.from_numpy(value) for key, value in load_file(str(TINY_STATE_DICT)).items()},
        path,
    )
    state_dict = read_state_dict(path)
    assert_matches_torchvision(resnet_variables_from_state_dict(state_dict, tiny_resnet()))


def test_pixels_are_normalised_like_totensor_then_normalize():
    """Module on uint8 pixels == network on (x / 255 - mean) / std computed in numpy."""
    variables = resnet_variables_from_state_dict(load_file(str(TINY_STATE_DICT)), tiny_resnet())
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    normalised = (
        pixels.astype(np.float32) / np.float32(255.0) - np.float32(IMAGENET_MEAN)
    ) / np.float32(IMAGENET_STD)
    module = tiny_resnet(("layer2",))
    from_pixels = module.apply(variables, pixels)["layer2"]
    from_floats = module.apply(variables, normalised, method=ResNet.forward_normalized)["layer2"]
    np.testing.assert_allclose(from_pixels, from_floats, rtol=0, atol=1e-5)
    # float pixels 0..255 give the same as uint8
    np.testing.assert_allclose(
        module.apply(variables, pixels.astype(np.float32))["layer2"], from_pixels, rtol=0, atol=0
    )


# torchvision's documented parameter counts (batch-norm running statistics excluded).
TORCHVISION_PARAMETERS = {
    "wide_resnet50_2": 68_883_240,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "wide_resnet101_2": 126_886_696,
    "resnext101_32x8d": 88_791_336,
}


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMETERS))
def test_architectures_match_torchvision(name):
    module = resnet(name, RESNET_STAGES)
    shapes = variable_shapes(module)
    assert (
        sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) == TORCHVISION_PARAMETERS[name]
    )
    outputs = jax.eval_shape(
        module.apply, shapes, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
    )
    expansion = 1 if name == "resnet18" else 4
    assert {key: value.shape for key, value in outputs.items()} == {
        "layer1": (1, 56, 56, 64 * expansion),
        "layer2": (1, 28, 28, 128 * expansion),
        "layer3": (1, 14, 14, 256 * expansion),
        "layer4": (1, 7, 7, 512 * expansion),
        "logits": (1, 1000),
    }


def test_wide_resnet_bottleneck_width_and_stride_placement():
    """torchvision puts the stride on the 3x3 conv; the wide bottleneck is 2x as wide."""
    params = variable_shapes(resnet("wide_resnet50_2", ("layer2",)))["params"]
    block = params["layer2"]["0"]
    assert block["conv1"]["kernel"].shape == (1, 1, 256, 256)
    assert block["conv2"]["kernel"].shape == (3, 3, 256, 256)
    assert block["conv3"]["kernel"].shape == (1, 1, 256, 512)
    assert block["downsample"]["0"]["kernel"].shape == (1, 1, 256, 512)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
    jaxpr = jax.make_jaxpr(resnet("wide_resnet50_2", ("layer2",)).apply)(
        variable_shapes(resnet("wide_resnet50_2", ("layer2",))), images
    )
    strides = [
        (eqn.invars[1].aval.shape, eqn.params["window_strides"])
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "conv_general_dilated"
    ]
    # first block of layer2: conv1 1x1 stride 1, conv2 3x3 stride 2, downsample 1x1 stride 2
    assert ((1, 1, 256, 256), (1, 1)) in strides
    assert ((3, 3, 256, 256), (2, 2)) in strides
    assert ((1, 1, 256, 512), (2, 2)) in strides


def count_convolutions(module, variables) -> tuple[int, int]:
    """(convolutions, matmuls) in the traced forward pass at 224 px."""
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    jaxpr = jax.make_jaxpr(module.apply)(variables, images)
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    return names.count("conv_general_dilated"), names.count("dot_general")


def test_nothing_after_the_deepest_requested_stage_is_computed():
    backbone = init_backbone("wide_resnet50_2")
    assert backbone.layers == default_layers("wide_resnet50_2") == ("layer2", "layer3")
    assert set(backbone.variables["params"]) == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert set(backbone.variables["batch_stats"]) == {"bn1", "layer1", "layer2", "layer3"}
    # conv1 + layer1 (3 blocks x 3 + downsample) + layer2 (4 x 3 + 1) + layer3 (6 x 3 + 1)
    assert count_convolutions(backbone.module, backbone.variables) == (1 + 10 + 13 + 19, 0)
    full = resnet("wide_resnet50_2", RESNET_STAGES)
    assert count_convolutions(full, variable_shapes(full)) == (1 + 10 + 13 + 19 + 10, 1)
    shapes = jax.eval_shape(
        backbone.feature_maps, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    )
    assert {k: v.shape for k, v in shapes.items()} == {
        "layer2": (2, 28, 28, 512),
        "layer3": (2, 14, 14, 1024),
    }


def test_stage_outputs_come_in_network_order():
    backbone = init_backbone("resnet18", ("layer3", "layer1"))
    assert backbone.layers == ("layer1", "layer3")
    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    assert list(jax.jit(backbone.module.apply)(backbone.variables, images)) == ["layer1", "layer3"]


@pytest.mark.parametrize("patch_stride", [1, 2])
def test_layer3_layer4_patch_features_equal_the_numpy_aggregation_of_torchvisions_stages(
    patch_stride,
):
    """The paper's mSTC pair: asked for layer4 and layer3 (either order) the tiny fixture ResNet
    runs through layer4, returns layer3 first, and the patch features take layer3's grid;
    equal to the float64 aggregation of torchvision's own layer3/layer4 outputs within the
    float32 rounding of the aggregation plus the aggregation of the stage differences."""
    assert init_backbone("resnet18", ("layer4", "layer3")).layers == ("layer3", "layer4")
    variables = resnet_variables_from_state_dict(load_file(str(TINY_STATE_DICT)), tiny_resnet())
    io = load_fixture("torchvision_tiny_resnet_io")
    images = jnp.asarray(io["input_nchw"].transpose(0, 2, 3, 1))
    module = tiny_resnet(("layer3", "layer4"))
    stages = module.apply(variables, images, method=ResNet.forward_normalized)
    assert list(stages) == ["layer3", "layer4"]
    ours_maps = [np.asarray(stages[name]) for name in stages]
    torch_maps = [io[f"{name}_nchw"].transpose(0, 2, 3, 1) for name in stages]
    dims = (1024, 384, 3, patch_stride)
    ours = np.asarray(features.patch_features(ours_maps, *dims), np.float64)
    expected = numpy_patch_features(torch_maps, *dims)
    rows, cols = ((size - 1) // patch_stride + 1 for size in (6, 5))  # layer3's 6 x 5 grid
    assert ours.shape == expected.shape == (2, rows * cols, 384)
    stage_differences = [np.abs(a - b) for a, b in zip(ours_maps, torch_maps, strict=True)]
    bound = rounding_bound(ours_maps, *dims) + numpy_patch_features(stage_differences, *dims)
    assert np.all(np.abs(ours - expected) <= bound)


def test_invalid_names_and_layers():
    with pytest.raises(ValueError, match="available.*wide_resnet50_2"):
        init_backbone("resnet1000")
    with pytest.raises(ValueError, match="layer1.*layer4"):
        init_backbone("resnet18", ("layer5",))
    with pytest.raises(ValueError, match="distinct"):
        init_backbone("resnet18", ("layer2", "layer2"))
    assert available_backbones()[0] == "wide_resnet50_2"


# ---------------------------------------------------------------- the reference's BatchNorm probe

PROBE = FIXTURES / "reference_probe_tiny_resnet.safetensors"


def probed_tiny_variables(layers=("layer2", "layer3")):
    """Full tiny-ResNet variables after the probe of a module returning ``layers`` at 96x80."""
    variables = resnet_variables_from_state_dict(load_file(str(TINY_STATE_DICT)), tiny_resnet())
    return variables, probe_batch_stats(tiny_resnet(layers), variables, (96, 80))


def test_probe_reproduces_the_reference_batch_norm_statistics():
    pristine, probed = probed_tiny_variables()
    reference = load_file(str(PROBE))
    reference_keys = {key for key in reference if not key.endswith("num_batches_tracked")}
    changed = {}
    for path, value in _flatten(probed["batch_stats"], ("batch_stats",)).items():
        before = _flatten(pristine["batch_stats"], ("batch_stats",))[path]
        if not np.array_equal(np.asarray(value), np.asarray(before)):
            changed[torch_key(path)] = np.asarray(value)
    # Exactly the reference's changed statistics (its counters have no Flax counterpart) ...
    assert set(changed) == reference_keys and len(reference_keys) == 32
    for key in reference_keys:
        assert relative_error(changed[key], reference[key]) < 1e-5, key
    # ... and the weights are untouched.
    assert probed["params"] is pristine["params"]


def test_probed_patch_features_equal_the_reference_embed():
    _, probed = probed_tiny_variables()
    io = load_fixture("reference_probe_tiny_resnet_io")
    images = jnp.asarray(io["input_nchw"].transpose(0, 2, 3, 1))
    module = tiny_resnet(("layer2", "layer3"))
    stage_outputs = module.apply(probed, images, method=ResNet.forward_normalized)
    patch_features = features.patch_features(
        list(stage_outputs.values()),
        pretrain_embed_dimension=1024,
        target_embed_dimension=1024,
        patch_size=3,
    ).reshape(-1, 1024)
    assert patch_features.shape == io["features"].shape == (2 * 12 * 10, 1024)
    assert relative_error(patch_features, io["features"]) < 1e-5


def test_probe_stops_at_the_deepest_requested_stage():
    pristine, probed = probed_tiny_variables(("layer1",))
    for stage in ("layer2", "layer3", "layer4"):
        jax.tree.map(
            np.testing.assert_array_equal,
            probed["batch_stats"][stage],
            pristine["batch_stats"][stage],
        )
    assert not np.array_equal(
        probed["batch_stats"]["layer1"]["0"]["bn1"]["mean"],
        pristine["batch_stats"]["layer1"]["0"]["bn1"]["mean"],
    )


def test_probe_is_a_pure_function_and_needs_more_than_one_value_per_channel():
    _, first = probed_tiny_variables()
    _, second = probed_tiny_variables()
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)
    variables = resnet_variables_from_state_dict(load_file(str(TINY_STATE_DICT)), tiny_resnet())
    with pytest.raises(ValueError, match="more than one value per channel"):
        probe_batch_stats(tiny_resnet(RESNET_STAGES[:4]), variables, (8, 8))


def test_probe_batch_norm_records_the_shape_and_leaves_batchnorm_free_backbones_alone():
    backbone = init_backbone("resnet18")
    probed = probe_batch_norm(backbone, (64, 48))
    assert probed.probed_image_shape == (64, 48) and backbone.probed_image_shape is None
    mean = probed.variables["batch_stats"]["layer2"]["0"]["bn1"]["mean"]
    assert not np.array_equal(mean, backbone.variables["batch_stats"]["layer2"]["0"]["bn1"]["mean"])
    with pytest.raises(ValueError, match="already probed"):
        probe_batch_norm(probed, (64, 48))
    mobilenet = load_backbone("mobilenet_v2")
    assert not mobilenet.has_batch_stats
    assert probe_batch_norm(mobilenet, (224, 224)).variables is mobilenet.variables
