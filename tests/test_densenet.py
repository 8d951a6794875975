"""DenseNet backbones: torchvision parity on the reduced fixture to float32 rounding, the
authors' BatchNorm probe, conversion (torchvision old/new keys, timm), densenet201's layout."""

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
from safetensors.numpy import load_file

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


def reduced_densenet(layers=DENSENET_STAGES) -> DenseNet:
    """The fixture's ``torchvision.models.DenseNet(8, (2, 3, 2, 2), 16, 2, num_classes=10)``."""
    return DenseNet(8, (2, 3, 2, 2), 16, 2, 10, tuple(layers))


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


def test_reduced_densenet_stages_equal_torchvision():
    """Every stage against torchvision's float64 run of the same float32 weights and input, with
    the tiny ResNet's tolerance (tests/test_resnet.py). A worst-case float32 bound (|W|
    propagation of Higham's gamma_n, layer by layer) holds but is vacuous here: it reaches 2% of
    the largest denseblock1 value, since random-sign weights cancel errors the bound cannot."""
    io = load_fixture("torchvision_reduced_densenet_io")
    outputs = forward_normalized(reduced_densenet(), reduced_variables(), nhwc(io["input_nchw"]))
    assert list(outputs) == list(DENSENET_STAGES)
    for name in DENSENET_STAGES[:-1]:
        reference = nhwc(io[f"{name}_nchw"])
        assert outputs[name].shape == reference.shape
        assert relative_error(outputs[name], reference) < 1e-4, name
    assert relative_error(outputs["logits"], io["logits"]) < 1e-4


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
    for key in reference_keys:  # the tiny ResNet's recipe (tests/test_resnet.py)
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
    aggregation (``PatchCore._embed``, run in float64 on the probed torchvision network)."""
    _, probed = probed_reduced_variables()
    io = load_fixture("reference_probe_reduced_densenet_io")
    images = nhwc(load_fixture("torchvision_reduced_densenet_io")["input_nchw"])
    stages = forward_normalized(reduced_densenet(PROBE_LAYERS), probed, images)
    for name in PROBE_LAYERS:
        assert relative_error(stages[name], nhwc(io[f"{name}_nchw"])) < 1e-4, name
    pretrain, target = 128, 64
    ours = features.patch_features(list(stages.values()), pretrain, target, 3).reshape(-1, target)
    assert ours.shape == io["features"].shape == (2 * 12 * 10, target)
    assert relative_error(ours, io["features"]) < 1e-5
