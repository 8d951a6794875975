"""Weight conversion: key checks, stored conversions with manifests, fetching, missing weights."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, WEIGHTS
from safetensors.numpy import load_file, save_file

from patchcore_jax.backbones import (
    available_backbones,
    convert,
    convert_weights,
    describe_weights,
    fetch_weights,
    init_backbone,
    load_backbone,
    weights_dir,
    weights_status,
)
from patchcore_jax.backbones.convert import (
    check_variables,
    resnet_variables_from_state_dict,
    torch_key,
    variable_shapes,
)
from patchcore_jax.backbones.resnet import RESNET_STAGES, resnet


def _flat(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@pytest.fixture(scope="module")
def wide_resnet_state_dict() -> dict[str, np.ndarray]:
    """Every key of the real wide_resnet50_2 state dict with its shape; cheap constant values."""
    shapes = json.loads((FIXTURES / "wide_resnet50_2_shapes.json").read_text())
    return {
        key: np.broadcast_to(np.float32(0.01), shape)
        if shape
        else np.array(0, np.int64)  # num_batches_tracked
        for key, shape in shapes.items()
    }


def test_wide_resnet50_2_consumes_every_key(wide_resnet_state_dict):
    assert len(wide_resnet_state_dict) == 320
    module = resnet("wide_resnet50_2", RESNET_STAGES)
    variables = resnet_variables_from_state_dict(wide_resnet_state_dict, module)
    expected = variable_shapes(module)
    check_variables(variables, expected, "converted wide_resnet50_2")  # no missing/extra/shape
    converted_keys = {torch_key(path) for path, _ in _flat(variables)}
    used = {k for k in wide_resnet_state_dict if not k.endswith("num_batches_tracked")}
    assert converted_keys == used and len(used) == 267


def test_one_error_names_all_bad_keys(wide_resnet_state_dict):
    state_dict = {f"module.{k}": v for k, v in wide_resnet_state_dict.items()}  # DataParallel
    del state_dict["module.layer3.2.bn2.running_var"]
    state_dict["module.layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state_dict["module.fc.weight"] = np.zeros((10, 2048), np.float32)
    with pytest.raises(ValueError) as error:
        resnet_variables_from_state_dict(state_dict, resnet("wide_resnet50_2", RESNET_STAGES))
    message = str(error.value)
    assert "3 problems" in message
    assert "missing: layer3.2.bn2.running_var (512,)" in message
    assert "unexpected: layer5.0.conv1.weight" in message
    assert "wrong shape: fc.weight is (10, 2048), expected (1000, 2048)" in message


def random_resnet18_file(path, seed: int = 0) -> dict:
    """Writes a random resnet18 state dict in torchvision layout; returns its Flax variables."""
    variables = init_backbone("resnet18", RESNET_STAGES, seed=seed).variables
    rng = np.random.default_rng(seed)
    tensors = {}
    for flax_path, value in _flat(jax.tree.map(np.asarray, variables)):
        if flax_path[-1] == "var":  # non-trivial running statistics
            value = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
        elif flax_path[-1] in ("mean", "bias", "scale"):
            value = rng.normal(0.0, 0.1, value.shape).astype(np.float32) + (
                1.0 if flax_path[-1] == "scale" else 0.0
            )
        tensors[torch_key(flax_path)] = {
            4: lambda a: a.transpose(3, 2, 0, 1),
            2: lambda a: a.T,
        }.get(value.ndim, lambda a: a)(value)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    return tensors


def test_convert_then_load_round_trip(tmp_path):
    source = tmp_path / "resnet18_random.safetensors"
    tensors = random_resnet18_file(source)
    out = tmp_path / "weights"
    converted = convert_weights(source, "resnet18", out)
    assert converted == out / "resnet18.msgpack"
    assert sorted(p.name for p in out.iterdir()) == ["resnet18.json", "resnet18.msgpack"]
    manifest = json.loads((out / "resnet18.json").read_text())
    source_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["architecture"] == "resnet18"
    assert manifest["source_file"] == source.name
    assert manifest["source_sha256"] == source_sha
    assert manifest["weights_sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert {"converter", "package_version", "date"} <= set(manifest)

    backbone = load_backbone("resnet18", ["layer1", "layer2"], weights_dir=out)
    assert backbone.weights_sha256 == source_sha
    assert set(backbone.variables["params"]) == {"conv1", "bn1", "layer1", "layer2"}
    np.testing.assert_array_equal(
        backbone.variables["params"]["layer2"]["0"]["conv2"]["kernel"],
        tensors["layer2.0.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        backbone.variables["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"],
        tensors["layer2.0.downsample.1.running_var"],
    )
    # Same outputs as the converter's in-memory variables.
    direct = resnet_variables_from_state_dict(
        load_file(str(source)), resnet("resnet18", RESNET_STAGES)
    )
    images = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    expected = resnet("resnet18", ("layer1", "layer2")).apply(direct, images)
    for name, value in backbone.feature_maps(images).items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=0)


def test_failed_conversion_leaves_existing_files_alone(tmp_path):
    source = tmp_path / "resnet18_random.safetensors"
    random_resnet18_file(source)
    convert_weights(source, "resnet18", tmp_path)
    before = (tmp_path / "resnet18.msgpack").read_bytes()
    with pytest.raises(ValueError, match="problems"):
        convert_weights(source, "resnet50", tmp_path)  # wrong architecture for the file
    assert (tmp_path / "resnet18.msgpack").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "resnet18.json",
        "resnet18.msgpack",
        source.name,
    ]


def test_fetch_verifies_the_hash_prefix_and_converts(tmp_path):
    pytest.importorskip("torch")
    served = tmp_path / "served"
    served.mkdir()
    good = served / "resnet18.pth"
    random_resnet18_file(good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    named = good.rename(served / f"resnet18-{digest[:8]}.pth")
    out = tmp_path / "weights"
    path = fetch_weights("resnet18", out, url=named.as_uri())
    assert path == out / "resnet18.msgpack"
    assert sorted(p.name for p in out.iterdir()) == ["resnet18.json", "resnet18.msgpack"]
    manifest = json.loads((out / "resnet18.json").read_text())
    assert manifest["source_file"] == named.name and manifest["source_sha256"] == digest
    assert load_backbone("resnet18", weights_dir=out).weights_sha256 == digest


def test_fetch_refuses_a_wrong_hash_and_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    wrong = served / "resnet18-00000000.pth"
    wrong.write_bytes(b"not the weights")
    out = tmp_path / "weights"
    with pytest.raises(ValueError, match="does not start with 00000000"):
        fetch_weights("resnet18", out, url=wrong.as_uri())
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="nothing to fetch"):
        fetch_weights("mobilenet_v2", out)


def test_missing_weights_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_backbone("wide_resnet50_2", weights_dir=tmp_path)
    assert "patchcore-jax weights fetch wide_resnet50_2" in str(error.value)
    assert "patchcore-jax weights convert FILE --arch wide_resnet50_2" in str(error.value)
    assert "set the PATCHCORE_WEIGHTS environment variable" in str(error.value)
    with pytest.raises(FileNotFoundError, match="--arch mobilenet_v2"):
        load_backbone("mobilenet_v2", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_weights(tmp_path / "nothing.pth", "resnet18", tmp_path)
    with pytest.raises(ValueError, match="available"):
        load_backbone("vgg16", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="stride8"):
        load_backbone("mobilenet_v2", ["layer2"], weights_dir=WEIGHTS)


def test_tflite_conversion_is_stored_with_its_layout(tmp_path):
    path = convert_weights(WEIGHTS / "mobilenet_v2_1.0_224_ptq.tflite", "mobilenet_v2", tmp_path)
    manifest = json.loads((tmp_path / "mobilenet_v2.json").read_text())
    assert path.name == "mobilenet_v2.msgpack" and len(manifest["layout"]["blocks"]) == 17
    stored = load_backbone("mobilenet_v2", ["stride16", "logits"], weights_dir=tmp_path)
    shipped = load_backbone("mobilenet_v2", ["stride16", "logits"], weights_dir=WEIGHTS)
    assert stored.module == shipped.module
    assert stored.weights_sha256 == shipped.weights_sha256
    images = jnp.full((1, 64, 64, 3), 200, jnp.uint8)
    for name, value in stored.feature_maps(images).items():
        np.testing.assert_array_equal(value, shipped.feature_maps(images)[name])


def test_weights_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path
    monkeypatch.delenv("PATCHCORE_WEIGHTS")
    assert weights_dir() == WEIGHTS  # editable install: the checkout's weights/


def test_mobilenet_v2_loads_from_the_package_when_the_weights_folder_is_elsewhere(
    monkeypatch, tmp_path
):
    """An installed package's weights folder (here $PATCHCORE_WEIGHTS, empty) holds no TFLite
    file: the default load reads the copy shipped with the package, the same weights."""
    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path))
    assert weights_status("mobilenet_v2") == "tflite"
    assert weights_status("mobilenet_v2", weights_dir=tmp_path) == "missing"  # a given folder
    assert weights_status("resnet18") == "missing"
    default = load_backbone("mobilenet_v2", ["stride8"])
    shipped = load_backbone("mobilenet_v2", ["stride8"], weights_dir=WEIGHTS)
    assert default.weights_sha256 == shipped.weights_sha256
    convert_weights(WEIGHTS / "mobilenet_v2_1.0_224_ptq.tflite", "mobilenet_v2", tmp_path)
    assert weights_status("mobilenet_v2") == "converted"


def test_weights_list_is_one_short_line_per_backbone_with_the_command_that_gets_it(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path))
    lines = describe_weights()
    assert lines[0].startswith(f"weights folder: {tmp_path}")
    rows = dict(line.split(maxsplit=1) for line in lines[1:])
    assert list(rows) == list(available_backbones())
    assert rows["wide_resnet50_2"] == (
        "missing: get it with `patchcore-jax weights fetch wide_resnet50_2`"
    )
    assert rows["mobilenet_v2"] == "the bundled TFLite file (offline)"
    assert all(len(line) <= 100 for line in lines[1:])  # no multi-sentence errors


@pytest.mark.parametrize(
    "suffix, arch, message",
    [
        (".pth", "resnet18", r"is not a readable PyTorch state dict: damaged, truncated"),
        (".safetensors", "resnet18", r"is not a readable \.safetensors file \(safetensors\."),
        (".tflite", "mobilenet_v2", r"is not a readable TFLite MobileNetV2 file \(struct\.error"),
    ],
)
def test_corrupt_weight_files_are_one_value_error_naming_the_file(tmp_path, suffix, arch, message):
    if suffix == ".pth":
        pytest.importorskip("torch")
    source = tmp_path / f"corrupt{suffix}"
    source.write_bytes(np.random.default_rng(0).bytes(5000))
    out = tmp_path / "weights"
    with pytest.raises(ValueError, match=message) as caught:
        convert_weights(source, arch, out)
    assert str(source) in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_failed_downloads_name_the_url(tmp_path):
    missing = (tmp_path / "resnet18-00000000.pth").as_uri()
    with pytest.raises(OSError, match=f"cannot download {missing}: "):
        fetch_weights("resnet18", tmp_path / "weights", url=missing)
    refused = "http://127.0.0.1:9/resnet18-00000000.pth"  # nothing listens there (offline too)
    with pytest.raises(OSError, match=f"cannot download {refused}: .*refused"):
        fetch_weights("resnet18", tmp_path / "weights", url=refused)
    assert list((tmp_path / "weights").iterdir()) == []


def test_fetch_resnext101_32x8d_asks_for_torchvision_file_and_its_hash_prefix(
    tmp_path, monkeypatch
):
    """The entry names torchvision's IMAGENET1K_V1 file; a file of that name whose sha256 does
    not start with its 8 digits is refused and deleted."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "resnext101_32x8d-8ba56ff5.pth").write_bytes(b"not the weights")
    monkeypatch.setattr(convert, "TORCHVISION_URL", served.as_uri() + "/")
    out = tmp_path / "weights"
    with pytest.raises(ValueError, match="resnext101_32x8d-8ba56ff5.pth: sha256 .* 8ba56ff5"):
        fetch_weights("resnext101_32x8d", out)
    assert list(out.iterdir()) == []


def test_fetch_resnext101_32x8d_converts_the_download_as_resnext(tmp_path):
    """A download with the right hash prefix is converted as the 101-layer ResNeXt: a state dict
    of another architecture is one error listing ResNeXt's keys, and nothing is left behind
    (a complete 356 MB conversion is the resnet18 test's path with other shapes)."""
    served = tmp_path / "served"
    served.mkdir()
    source = served / "partial.safetensors"
    save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, str(source))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = source.rename(served / f"resnext101_32x8d-{digest[:8]}.safetensors")
    out = tmp_path / "weights"
    with pytest.raises(ValueError, match="does not match the ResNet") as error:
        fetch_weights("resnext101_32x8d", out, url=named.as_uri())
    assert "missing: layer3.22.conv2.weight (1024, 32, 3, 3)" in str(error.value)
    assert "missing: layer1.0.conv2.weight (256, 8, 3, 3)" in str(error.value)
    assert list(out.iterdir()) == []
