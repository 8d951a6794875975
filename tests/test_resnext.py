"""ResNeXt (resnet.py with grouped 3x3 convolutions): torchvision parity on a reduced ResNeXt
built by torchvision's own ResNet class, the reference's BatchNorm probe and patch features on
it, and the full resnext101_32x8d's state-dict keys and shapes.

Fixtures: tests/fixtures/make_torchvision_resnext.py.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from conftest import FIXTURES, load_fixture
from safetensors.numpy import load_file
from torch_parity import BoundedLayers, start, to_nhwc

from patchcore_jax import features
from patchcore_jax.backbones import available_backbones, default_layers, stage_names
from patchcore_jax.backbones.convert import (
    _flatten,
    _torch_shape,
    resnet_variables_from_state_dict,
    torch_key,
    variable_shapes,
)
from patchcore_jax.backbones.resnet import (
    RESNET_STAGES,
    Bottleneck,
    ResNet,
    ResNetStage,
    probe_batch_stats,
    resnet,
)

TINY = FIXTURES / "torchvision_tiny_resnext.safetensors"
GROUPS, WIDTH_PER_GROUP = 4, 4
# stage -> (blocks, planes, stride), as in the fixture's ResNet(Bottleneck, [1, 2, 1, 1], ...)
TINY_STAGES = {"layer1": (1, 64, 1), "layer2": (2, 128, 2), "layer3": (1, 256, 2)}


def tiny_resnext(layers=("layer1", "layer2", "layer3")) -> ResNet:
    return ResNet(Bottleneck, (1, 2, 1, 1), WIDTH_PER_GROUP, 10, tuple(layers), groups=GROUPS)


@functools.cache
def tiny_variables() -> dict:
    return resnet_variables_from_state_dict(load_file(str(TINY)), tiny_resnext())


def relative_error(ours, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def nhwc(nchw: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(nchw.transpose(0, 2, 3, 1))


# ------------------------------------------------ float64 forward pass with a rounding bound


class BoundedForward(BoundedLayers):
    """The tiny ResNeXt in float64 with float32 rounding bounds (tests/torch_parity.py)."""

    def block(self, x, e, prefix, stride):
        y, b = self.relu(*self.batch_norm(*self.conv(x, e, f"{prefix}.conv1", 1), f"{prefix}.bn1"))
        y, b = self.conv(y, b, f"{prefix}.conv2", stride, GROUPS)
        y, b = self.relu(*self.batch_norm(y, b, f"{prefix}.bn2"))
        y, b = self.batch_norm(*self.conv(y, b, f"{prefix}.conv3", 1), f"{prefix}.bn3")
        if f"{prefix}.downsample.0.weight" in self.tensors:
            shortcut = self.conv(x, e, f"{prefix}.downsample.0", stride)
            identity, identity_bound = self.batch_norm(*shortcut, f"{prefix}.downsample.1")
        else:
            identity, identity_bound = x, e
        return self.relu(*self.add(y, b, identity, identity_bound))

    def stage(self, x, e, name):
        num_blocks, _, stride = TINY_STAGES[name]
        for index in range(num_blocks):
            x, e = self.block(x, e, f"{name}.{index}", stride if index == 0 else 1)
        return x, e

    def stem(self, x, e):
        y, b = self.relu(*self.batch_norm(*self.conv(x, e, "conv1", 2), "bn1"))
        return self.max_pool(y, b, 3, 2, 1)


def exact_with_bound(forward: BoundedForward, steps, nchw: np.ndarray):
    x, e = start(nchw)
    for step in steps:
        x, e = step(x, e)
    return to_nhwc(x), to_nhwc(e)


def test_tiny_resnext_stages_equal_torchvision_within_the_float32_rounding_bound():
    """Each stage from torchvision's own input to it (the stem and layer1 from the images):
    ours and torchvision's are both within the derived bound of the exact value."""
    io = load_fixture("torchvision_tiny_resnext_io")
    variables = tiny_variables()
    forward = BoundedForward(load_file(str(TINY)))
    cases = {
        "layer1": (io["input_nchw"], (forward.stem, lambda x, e: forward.stage(x, e, "layer1"))),
        "layer2": (io["layer1_nchw"], (lambda x, e: forward.stage(x, e, "layer2"),)),
        "layer3": (io["layer2_nchw"], (lambda x, e: forward.stage(x, e, "layer3"),)),
    }
    for name, (stage_input, steps) in cases.items():
        if name == "layer1":
            apply = functools.partial(
                tiny_resnext(("layer1",)).apply, method=ResNet.forward_normalized
            )
            ours = jax.jit(apply)(variables, nhwc(stage_input))["layer1"]
        else:
            num_blocks, planes, stride = TINY_STAGES[name]
            module = ResNetStage(Bottleneck, num_blocks, planes, stride, WIDTH_PER_GROUP, GROUPS)
            stage_variables = {part: variables[part][name] for part in variables}
            ours = jax.jit(module.apply)(stage_variables, nhwc(stage_input))
        ours = np.asarray(ours, np.float64)
        reference = io[f"{name}_nchw"].transpose(0, 2, 3, 1).astype(np.float64)
        exact, bound = exact_with_bound(forward, steps, stage_input)
        assert ours.shape == reference.shape == exact.shape
        assert np.all(np.abs(reference - exact) <= bound), name  # the bound holds for torch
        assert np.all(np.abs(ours - exact) <= bound), name
        # The bound is far below the signal: a wrong grouping or stride could not hide in it.
        assert np.median(bound) < 1e-2 * np.abs(exact).max(), name


def test_tiny_resnext_matches_torchvision_end_to_end():
    """The whole forward pass from the images (bounds compound over stages, so the tiny
    ResNet's relative tolerance, tests/test_resnet.py, applies)."""
    io = load_fixture("torchvision_tiny_resnext_io")
    apply = functools.partial(tiny_resnext().apply, method=ResNet.forward_normalized)
    outputs = jax.jit(apply)(tiny_variables(), nhwc(io["input_nchw"]))
    assert list(outputs) == ["layer1", "layer2", "layer3"]
    for name, value in outputs.items():
        reference = io[f"{name}_nchw"].transpose(0, 2, 3, 1)
        assert value.shape == reference.shape
        assert relative_error(value, reference) < 1e-4, name


@functools.cache
def probed_tiny_variables() -> dict:
    """After the probe of a module returning layer2 + layer3 at 48x40 (jitted: one compile
    instead of one per operation)."""
    module = tiny_resnext(("layer2", "layer3"))
    return jax.jit(lambda variables: probe_batch_stats(module, variables, (48, 40)))(
        tiny_variables()
    )


def test_tiny_resnext_probe_reproduces_torchvision_train_mode_statistics():
    pristine, probed = tiny_variables(), probed_tiny_variables()
    reference = load_fixture("torchvision_tiny_resnext_io", "probe")
    changed = {}
    before = _flatten(pristine["batch_stats"], ("batch_stats",))
    for path, value in _flatten(probed["batch_stats"], ("batch_stats",)).items():
        if not np.array_equal(np.asarray(value), np.asarray(before[path])):
            changed[torch_key(path)] = np.asarray(value)
    assert set(changed) == set(reference) and len(reference) == 32  # every BN up to layer3
    for key, value in reference.items():
        assert relative_error(changed[key], value) < 1e-5, key


def test_tiny_resnext_patch_features_equal_the_authors_aggregation():
    """Probe, then eval-mode layer2 + layer3 -> locally aware patch features (1024 -> 384, as
    the authors' ensemble) == their aggregation of torchvision's stages."""
    io = load_fixture("torchvision_tiny_resnext_io")
    apply = functools.partial(
        tiny_resnext(("layer2", "layer3")).apply, method=ResNet.forward_normalized
    )
    stages = jax.jit(apply)(probed_tiny_variables(), nhwc(io["input_nchw"]))
    patch_features = features.patch_features(
        list(stages.values()),
        pretrain_embed_dimension=1024,
        target_embed_dimension=384,
        patch_size=3,
    ).reshape(-1, 384)
    assert patch_features.shape == io["features"].shape == (2 * 6 * 5, 384)
    assert relative_error(patch_features, io["features"]) < 1e-5


# --------------------------------------------------------------- the full resnext101_32x8d


def test_resnext101_32x8d_has_torchvision_keys_and_shapes():
    """Every state-dict key of torchvision's resnext101_32x8d with its shape, and no other."""
    torchvision_shapes = json.loads((FIXTURES / "resnext101_32x8d_shapes.json").read_text())
    expected = {
        key: tuple(shape)
        for key, shape in torchvision_shapes.items()
        if not key.endswith("num_batches_tracked")
    }
    ours = {
        torch_key(path): _torch_shape(tuple(leaf.shape))
        for path, leaf in _flatten(
            variable_shapes(resnet("resnext101_32x8d", RESNET_STAGES))
        ).items()
    }
    assert ours == expected and len(ours) == 522
    assert ours["layer1.0.conv2.weight"] == (256, 8, 3, 3)  # 32 groups of 8 channels
    assert ours["layer4.2.conv2.weight"] == (2048, 64, 3, 3)


def test_resnext101_32x8d_is_registered_like_the_other_resnets():
    assert stage_names("resnext101_32x8d") == RESNET_STAGES
    assert default_layers("resnext101_32x8d") == ("layer2", "layer3")
    assert "resnext101_32x8d" in available_backbones()
    shapes = variable_shapes(resnet("resnext101_32x8d", default_layers("resnext101_32x8d")))
    assert set(shapes["params"]) == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert set(shapes["batch_stats"]) == {"bn1", "layer1", "layer2", "layer3"}  # probed
    assert len(shapes["params"]["layer3"]) == 23
    assert shapes["params"]["layer3"]["0"]["conv2"]["kernel"].shape == (3, 3, 32, 1024)
