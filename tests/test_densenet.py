"""DenseNet backbones: torchvision parity on the reduced fixture, stage by stage within derived
float32 rounding bounds (tests/torch_parity.py), the authors' BatchNorm probe, conversion
(torchvision old/new keys, timm), densenet201's layout."""

from __future__ import annotations

import functools
import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture
from numpy_aggregation import numpy_patch_features, rounding_bound
from safetensors.numpy import load_file
from torch_parity import BoundedLayers, start, to_nhwc

from patchcore_jax import features
from patchcore_jax.backbones import (
    Backbone,
    default_layers,
    fetch_weights,
    init_backbone,
    probe_batch_norm,
    stage_names,
)
from patchcore_jax.backbones.convert import (
    _flatten,
    densenet_variables_from_state_dict,
    load_converted,
    torch_key,
    variable_shapes,
)
from patchcore_jax.backbones.densenet import DENSENET_STAGES, DenseNet, densenet
from patchcore_jax.backbones.resnet import probe_batch_stats

REDUCED_STATE_DICT = FIXTURES / "torchvision_reduced_densenet.safetensors"
PROBE = FIXTURES / "reference_probe_reduced_densenet.safetensors"
PROBE_LAYERS = ("denseblock2", "denseblock3")
BLOCK_CONFIG = (2, 3, 2, 2)


def reduced_densenet(layers=DENSENET_STAGES) -> DenseNet:
    """The fixture's ``torchvision.models.DenseNet(8, (2, 3, 2, 2), 16, 2, num_classes=10)``."""
    return DenseNet(8, BLOCK_CONFIG, 16, 2, 10, tuple(layers))


def reduced_variables() -> dict:
    return densenet_variables_from_state_dict(
        load_file(str(REDUCED_STATE_DICT)), reduced_densenet()
    )


def nhwc(nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))


def relative_error(ours, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def forward_normalized(module: DenseNet, variables, images_nhwc) -> dict[str, jax.Array]:
    """The module on already-normalised images, compiled once (eager dispatch is slow here)."""
    return jax.jit(functools.partial(module.apply, method="forward_normalized"))(
        variables, images_nhwc
    )


class BoundedDenseNet(BoundedLayers):
    """The reduced DenseNet in float64 with float32 rounding bounds (tests/torch_parity.py)."""

    def stem(self, x, e):
        y, b = self.relu(*self.batch_norm(*self.conv(x, e, "features.conv0", 2), "features.norm0"))
        return self.max_pool(y, b, 3, 2, 1)

    def block(self, x, e, index):
        for layer in range(BLOCK_CONFIG[index - 1]):
            prefix = f"features.denseblock{index}.denselayer{layer + 1}"
            y, b = self.relu(*self.batch_norm(x, e, f"{prefix}.norm1"))
            y, b = self.relu(
                *self.batch_norm(*self.conv(y, b, f"{prefix}.conv1", 1), f"{prefix}.norm2")
            )
            x, e = self.concat(x, e, *self.conv(y, b, f"{prefix}.conv2", 1))
        return x, e

    def transition(self, x, e, index):
        prefix = f"features.transition{index}"
        y, b = self.relu(*self.batch_norm(x, e, f"{prefix}.norm"))
        return self.avg_pool(*self.conv(y, b, f"{prefix}.conv", 1), 2)

    def head(self, x, e):
        y, b = self.spatial_mean(*self.relu(*self.batch_norm(x, e, "features.norm5")))
        return self.linear(y, b, "classifier")


def within(ours, exact: np.ndarray, bound: np.ndarray) -> bool:
    return bool(np.all(np.abs(np.asarray(ours, np.float64) - exact) <= bound))


def stage_from(network: BoundedDenseNet, name: str, stage_input: np.ndarray):
    """The float64 stage ``name`` (denseblock1 from the images, transition + denseblock<N> from
    denseblock<N-1>, logits from denseblock4) of ``stage_input`` [B, C, h, w] and its bound."""
    x, e = start(stage_input)
    if name == "logits":
        return (t.numpy() for t in network.head(x, e))
    index = int(name.removeprefix("denseblock"))
    x, e = network.stem(x, e) if index == 1 else network.transition(x, e, index - 1)
    return (to_nhwc(t) for t in network.block(x, e, index))


def test_reduced_densenet_stages_equal_torchvision_within_the_float32_rounding_bound():
    """Each stage (the logits included) computes the same function as torchvision's: from
    torchvision's float64 input to it, the float64 re-implementation lands on torchvision's
    output within the float32 rounding bound, and from our float32 input to it, our output is
    within the bound of the float64 stage. Bounds compound over stages (through the whole
    network the logits' bound is millions of times the logits), so each starts afresh."""
    io = load_fixture("torchvision_reduced_densenet_io")
    network = BoundedDenseNet(load_file(str(REDUCED_STATE_DICT)))
    ours = forward_normalized(reduced_densenet(), reduced_variables(), nhwc(io["input_nchw"]))
    assert list(ours) == list(DENSENET_STAGES)
    previous_ours = previous_reference = io["input_nchw"]
    for name in DENSENET_STAGES:
        ours_stage = np.asarray(ours[name])
        reference = io[f"{name}_nchw"] if name != "logits" else io["logits"]
        exact, bound = stage_from(network, name, previous_reference)
        if name != "logits":
            reference = nhwc(reference)
        assert ours_stage.shape == reference.shape == exact.shape, name
        assert within(reference, exact, bound), name  # the re-implementation is torchvision's
        exact, bound = stage_from(network, name, previous_ours)
        assert within(ours_stage, exact, bound), name
        # The bound is far below the signal: a wrong connection could not hide in it.
        assert np.median(bound) < 1e-3 * np.abs(exact).max(), name
        to_nchw = (0, 3, 1, 2) if name != "logits" else (0, 1)
        previous_reference = io[f"{name}_nchw"] if name != "logits" else None
        previous_ours = ours_stage.transpose(to_nchw)


def test_old_style_torchvision_keys_and_a_module_prefix_convert_the_same():
    """torchvision's first DenseNet files name ``norm.1``/``conv.2`` (renamed on load)."""
    state_dict = load_file(str(REDUCED_STATE_DICT))
    old_style = {
        "module." + re.sub(r"\.(norm|conv)([12])\.", r".\1.\2.", key): value
        for key, value in state_dict.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in {
        key.removeprefix("module.") for key in old_style
    }
    jax.tree.map(
        np.testing.assert_array_equal,
        densenet_variables_from_state_dict(old_style, reduced_densenet()),
        reduced_variables(),
    )
    del old_style["module.features.denseblock2.denselayer3.conv.2.weight"]
    with pytest.raises(ValueError, match=r"missing: features.denseblock2.denselayer3.conv2.weight"):
        densenet_variables_from_state_dict(old_style, reduced_densenet())


def densenet201_shapes() -> dict[str, list[int]]:
    """torchvision's (and timm's: the same keys) densenet201 state dict: key -> shape."""
    return json.loads((FIXTURES / "densenet201_shapes.json").read_text())


def test_densenet201_has_torchvision_and_timm_keys_shapes_and_parameter_count():
    module = densenet("densenet201", DENSENET_STAGES)
    shapes = variable_shapes(module)
    reference = densenet201_shapes()
    ours = {}
    for path, leaf in _flatten(shapes).items():
        shape = leaf.shape if len(leaf.shape) != 4 else tuple(np.take(leaf.shape, (3, 2, 0, 1)))
        ours[torch_key(path)] = list(shape if len(shape) != 2 else shape[::-1])
    counters = {key for key in reference if key.endswith("num_batches_tracked")}
    assert ours == {key: shape for key, shape in reference.items() if key not in counters}
    parameters = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
    assert parameters == 20_013_928  # torchvision's and timm's count


def test_densenet201_registered_with_the_authors_stages_and_stops_after_the_deepest():
    assert stage_names("densenet201") == DENSENET_STAGES
    assert default_layers("densenet201") == ("denseblock2", "denseblock3")
    module = densenet("densenet201")
    shapes = variable_shapes(module)
    assert set(shapes["params"]) == {"features"}
    assert set(shapes["params"]["features"]) == {
        "conv0",
        "norm0",
        "denseblock1",
        "transition1",
        "denseblock2",
        "transition2",
        "denseblock3",
    }
    jaxpr = jax.make_jaxpr(module.apply)(shapes, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))
    # conv0, 6 + 12 + 48 dense layers of two convs, two transitions; stride 8 and 16
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    assert names.count("conv_general_dilated") == 1 + 2 * (6 + 12 + 48) + 2
    assert [aval.shape for aval in jaxpr.out_avals] == [(1, 28, 28, 512), (1, 14, 14, 1792)]
    with pytest.raises(ValueError, match="denseblock1.*logits"):
        init_backbone("densenet201", ("layer2",))


def test_densenet201_fetch_verifies_and_converts_torchvisions_old_style_file(tmp_path):
    torch = pytest.importorskip("torch")
    marked = "features.denseblock1.denselayer1.norm.1.weight"
    state_dict = {}
    for key, shape in densenet201_shapes().items():
        old = re.sub(r"\.(norm|conv)([12])\.", r".\1.\2.", key)
        state_dict[old] = torch.zeros(shape, dtype=torch.int64 if not shape else torch.float32)
    state_dict[marked] = torch.arange(64, dtype=torch.float32)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "densenet201.pth"
    torch.save(state_dict, archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    named = archive.rename(served / f"densenet201-{digest[:8]}.pth")
    out = tmp_path / "weights"
    assert fetch_weights("densenet201", out, url=named.as_uri()) == out / "densenet201.msgpack"
    variables, manifest = load_converted("densenet201", out)
    assert manifest["source_sha256"] == digest and manifest["source_file"] == named.name
    norm1 = variables["params"]["features"]["denseblock1"]["denselayer1"]["norm1"]
    np.testing.assert_array_equal(norm1["scale"], np.arange(64, dtype=np.float32))
    with pytest.raises(ValueError, match="does not start with c1103571"):
        wrong = served / "densenet201-c1103571.pth"
        named.rename(wrong)
        fetch_weights("densenet201", out, url=wrong.as_uri())


# ------------------------------------------------------------- the authors' BatchNorm probe


@functools.cache
def probed_reduced_variables() -> tuple[dict, dict]:
    """(pristine, probed) variables of the reduced DenseNet; the probe at the fixture's 96x80."""
    pristine = reduced_variables()
    return pristine, probe_batch_stats(reduced_densenet(PROBE_LAYERS), pristine, (96, 80))


def test_probe_passes_the_norms_the_authors_probe_passes_with_their_statistics():
    """Hooks on denseblock2/denseblock3 stop the probe after denseblock3: norm0, the dense
    layers of blocks 1-3 and transitions 1-2 move; transition3, block 4 and norm5 do not."""
    pristine, probed = probed_reduced_variables()
    reference = load_file(str(PROBE))
    reference_keys = {key for key in reference if not key.endswith("num_batches_tracked")}
    before = _flatten(pristine["batch_stats"], ("batch_stats",))
    changed = {
        torch_key(path): np.asarray(value)
        for path, value in _flatten(probed["batch_stats"], ("batch_stats",)).items()
        if not np.array_equal(np.asarray(value), np.asarray(before[path]))
    }
    assert set(changed) == reference_keys and len(reference_keys) == 2 * 17
    assert not any("transition3" in key or "norm5" in key for key in changed)
    # A relative tolerance (the tiny ResNet's, tests/test_resnet.py), not a derived bound: the
    # worst-case bound of the float32 train-mode pass on the ones image is vacuous (at
    # denseblock1.denselayer2.norm1 a channel's batch variance is already below its own bound).
    for key in reference_keys:
        error = np.abs(changed[key] - reference[key]).max() / np.abs(reference[key]).max()
        assert error < 1e-5, key
    assert probed["params"] is pristine["params"]


def test_probe_batch_norm_probes_a_densenet_backbone():
    pristine, expected = probed_reduced_variables()
    module = reduced_densenet(PROBE_LAYERS)
    backbone = Backbone("densenet201", module, pristine, PROBE_LAYERS, "random-init")
    probed = probe_batch_norm(backbone, (96, 80))
    jax.tree.map(np.testing.assert_array_equal, probed.variables, expected)
    assert probed.probed_image_shape == (96, 80)


def test_probed_patch_features_equal_the_authors_aggregation():
    """Our probe, stages and locally aware patch features against the authors' probe and
    aggregation (``PatchCore._embed``, run in float64 on the probed torchvision network): given
    the stages, within the float32 rounding of the aggregation plus the aggregation of the stage
    differences (tests/numpy_aggregation.py). The stages differ by the probed statistics, which
    keep the probe test's tolerance."""
    _, probed = probed_reduced_variables()
    io = load_fixture("reference_probe_reduced_densenet_io")
    images = nhwc(load_fixture("torchvision_reduced_densenet_io")["input_nchw"])
    stages = forward_normalized(reduced_densenet(PROBE_LAYERS), probed, images)
    ours_maps = [np.asarray(stages[name]) for name in PROBE_LAYERS]
    reference_maps = [nhwc(io[f"{name}_nchw"]) for name in PROBE_LAYERS]
    for name, ours_map, reference_map in zip(PROBE_LAYERS, ours_maps, reference_maps, strict=True):
        assert relative_error(ours_map, reference_map) < 1e-4, name
    dims = (128, 64, 3, 1)
    ours = np.asarray(features.patch_features(ours_maps, *dims), np.float64).reshape(-1, 64)
    assert ours.shape == io["features"].shape == (2 * 12 * 10, 64)
    differences = [np.abs(a - b) for a, b in zip(ours_maps, reference_maps, strict=True)]
    bound = rounding_bound(ours_maps, *dims) + numpy_patch_features(differences, *dims)
    assert np.all(np.abs(ours - io["features"]) <= bound.reshape(-1, 64))
