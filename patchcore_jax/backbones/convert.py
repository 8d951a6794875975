"""Weights: torchvision/timm state dicts and TFLite files (read by ``tflite``) -> Flax variables,
stored with manifests.

A converted backbone is two files in the weights folder: ``<arch>.msgpack`` (the Flax variables,
``flax.serialization`` msgpack of float32 arrays) and ``<arch>.json`` (the manifest: source file
name and sha256, architecture, converter version, date; for MobileNetV2 also the layout read from
the TFLite file). Both are written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax.backbones.densenet import DENSENET_ARCHITECTURES, DENSENET_STAGES, densenet
from patchcore_jax.backbones.mobilenet_v2 import MOBILENET_STAGES, MobileNetV2, MobileNetV2Layout
from patchcore_jax.backbones.resnet import RESNET_ARCHITECTURES, RESNET_STAGES, ResNet, resnet
from patchcore_jax.backbones.tflite import read_tflite
from patchcore_jax.errors import MissingDependencyError
from patchcore_jax.files import atomic_path, download_file, first_line
from patchcore_jax.version import package_version

MANIFEST_FORMAT = "patchcore_jax.backbone_weights/1"
TORCHVISION_URL = "https://download.pytorch.org/models/"
# The 8 hex digits in each name are the first digits of the file's sha256.
TORCHVISION_FILES = {
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
    "resnext101_32x8d": "resnext101_32x8d-8ba56ff5.pth",
    "densenet201": "densenet201-c1103571.pth",
}
MOBILENET_TFLITE = "mobilenet_v2_1.0_224_ptq.tflite"
# The offline MobileNetV2 TFLite file (and its README): the repository's ``weights/``, which
# the wheel ships as package data ``patchcore_jax/weights/`` (pyproject.toml's package-dir).
_CHECKOUT = Path(__file__).resolve().parents[2]
_SOURCE_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "weights").is_dir()
BUNDLED_WEIGHTS = (
    _CHECKOUT if _SOURCE_CHECKOUT else Path(__file__).resolve().parents[1]
) / "weights"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def weights_dir() -> Path:
    """Default folder of converted weights: $PATCHCORE_WEIGHTS, else, in a source checkout
    (editable install), its ``weights/`` (``BUNDLED_WEIGHTS``), else
    ``~/.cache/patchcore_jax/weights`` (an installed package's folder may be read-only)."""
    from_env = os.environ.get("PATCHCORE_WEIGHTS")
    if from_env:
        return Path(from_env).expanduser()
    if _SOURCE_CHECKOUT:
        return BUNDLED_WEIGHTS
    return Path.home() / ".cache" / "patchcore_jax" / "weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- architecture shapes


def variable_shapes(module: nn.Module) -> dict[str, Any]:
    """The module's variable tree as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
    return jax.eval_shape(module.init, jax.random.key(0), images)


def full_module(arch: str, layout: MobileNetV2Layout | None = None) -> nn.Module:
    """``arch`` with every stage requested, so its variables cover the whole file."""
    if arch in RESNET_ARCHITECTURES:
        return resnet(arch, RESNET_STAGES)
    if arch in DENSENET_ARCHITECTURES:
        return densenet(arch, DENSENET_STAGES)
    if arch == "mobilenet_v2":
        if layout is None:
            raise ValueError("mobilenet_v2 needs the layout read from its TFLite file")
        return MobileNetV2(layout, MOBILENET_STAGES)
    raise ValueError(
        f"unknown architecture {arch!r}; available: "
        f"{(*RESNET_ARCHITECTURES, 'mobilenet_v2', *DENSENET_ARCHITECTURES)}"
    )


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raises ValueError naming every missing, unexpected and mis-shaped leaf of ``variables``."""
    got = {path: tuple(np.shape(v)) for path, v in _flatten(variables).items()}
    want = {path: tuple(v.shape) for path, v in _flatten(expected).items()}
    problems = [f"missing: {'/'.join(p)}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected: {'/'.join(p)}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"wrong shape: {'/'.join(p)} is {got[p]}, expected {want[p]}"
        for p in sorted(want.keys() & got.keys())
        if got[p] != want[p]
    ]
    if problems:
        raise ValueError(f"{what} does not match the architecture:\n  " + "\n  ".join(problems))


def select_variables(variables: Mapping[str, Any], used: Mapping[str, Any]) -> dict[str, Any]:
    """The sub-tree of ``variables`` with exactly the paths of ``used`` (e.g. fewer stages)."""
    flat = _flatten(variables)
    return _unflatten({path: flat[path] for path in _flatten(used)})


# --------------------------------------------------------------------------- ResNet state dicts

# Flax leaf name -> torchvision parameter name.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(path: tuple[str, ...]) -> str:
    """Flax path ("batch_stats", "layer1", "0", "downsample", "1", "var") ->
    torchvision key "layer1.0.downsample.1.running_var"."""
    collection, *names, leaf = path
    return ".".join((*names, _LEAF_TO_TORCH[(collection, leaf)]))


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv HWIO -> OIHW, Dense [in, out] -> [out, in], vectors unchanged."""
    if len(flax_shape) == 4:
        height, width, fan_in, fan_out = flax_shape
        return (fan_out, fan_in, height, width)
    if len(flax_shape) == 2:
        return flax_shape[::-1]
    return flax_shape


def _from_torch(array: np.ndarray) -> np.ndarray:
    """Inverse of ``_torch_shape`` on the values."""
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array


def resnet_variables_from_state_dict(
    state_dict: Mapping[str, Any], module: ResNet
) -> dict[str, Any]:
    """torchvision/timm ResNet state dict -> Flax variables {'params', 'batch_stats'} (float32).

    ``module`` should request every stage (``layers=RESNET_STAGES``) so the whole state dict is
    consumed. Accepts a leading ``module.`` (DataParallel) and ignores ``num_batches_tracked``.
    Every key and shape is checked; one ValueError names all missing, unexpected and mis-shaped
    keys.
    """
    return _variables_from_torch_keys(state_dict, module, "ResNet")


# torchvision's first DenseNet files (densenet201-c1103571.pth among them) name a dense layer's
# submodules ``norm.1``/``relu.1``/``conv.1``; its ``_load_state_dict`` renames them ``norm1``...
_OLD_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|"
    r"num_batches_tracked)$"
)


def densenet_variables_from_state_dict(
    state_dict: Mapping[str, Any], module: nn.Module
) -> dict[str, Any]:
    """torchvision/timm DenseNet state dict -> Flax variables {'params', 'batch_stats'}.

    ``module`` (a ``densenet.DenseNet``) should request every stage (``DENSENET_STAGES``).
    Accepts torchvision's old-style dense-layer keys (``norm.1.weight``), timm's names (the same
    as torchvision's current ones) and a leading ``module.``; checks every key and shape like
    ``resnet_variables_from_state_dict``.
    """
    renamed = {
        _OLD_DENSE_LAYER_KEY.sub(r"\1\2.\3", key): value for key, value in state_dict.items()
    }
    return _variables_from_torch_keys(renamed, module, "DenseNet")


def _variables_from_torch_keys(
    state_dict: Mapping[str, Any], module: nn.Module, what: str
) -> dict[str, Any]:
    """The shared conversion: keys named after the Flax paths (``torch_key``), every key and
    shape checked, conv/dense kernels transposed."""
    tensors = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if not name.endswith("num_batches_tracked"):
            tensors[name] = value
    expected = _flatten(variable_shapes(module))
    wanted = {torch_key(path): (path, _torch_shape(tuple(s.shape))) for path, s in expected.items()}
    problems = [
        f"missing: {key} {wanted[key][1]}" for key in sorted(wanted.keys() - tensors.keys())
    ]
    problems += [
        f"unexpected: {key} {tuple(np.shape(tensors[key]))}"
        for key in sorted(tensors.keys() - wanted.keys())
    ]
    problems += [
        f"wrong shape: {key} is {tuple(np.shape(tensors[key]))}, expected {wanted[key][1]}"
        for key in sorted(wanted.keys() & tensors.keys())
        if tuple(np.shape(tensors[key])) != wanted[key][1]
    ]
    if problems:
        raise ValueError(
            f"state dict does not match the {what} ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )
    flat = {
        path: _from_torch(np.asarray(tensors[key], np.float32)) for key, (path, _) in wanted.items()
    }
    return _unflatten(flat)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``.safetensors`` (numpy, no torch) or ``.pth``/``.pt``/``.bin`` (needs torch) -> arrays."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as error:  # SafetensorError and friends: a damaged or foreign file
            raise ValueError(
                f"{path} is not a readable .safetensors file ({first_line(error)})"
            ) from error
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as error:
            raise MissingDependencyError(
                f"reading {path.name} needs PyTorch: pip install 'patchcore-jax[torch]' "
                "(or convert a .safetensors copy of the weights, which needs no torch)"
            ) from error
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, RuntimeError, EOFError: damaged or foreign
            raise ValueError(
                f"{path} is not a readable PyTorch state dict: damaged, truncated or not written "
                f"by torch.save ({type(error).__name__})"
            ) from error
        if isinstance(loaded, Mapping) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a state dict")
        return {
            key: (value.float() if value.is_floating_point() else value).numpy()
            for key, value in loaded.items()
        }
    raise ValueError(
        f"cannot read weights from {path.name}: expected one of {STATE_DICT_SUFFIXES} or .tflite"
    )


# --------------------------------------------------------------------------- stored conversions


def converted_paths(arch: str, directory: str | Path) -> tuple[Path, Path]:
    """(``<dir>/<arch>.msgpack``, ``<dir>/<arch>.json``)."""
    directory = Path(directory)
    return directory / f"{arch}.msgpack", directory / f"{arch}.json"


def save_converted(
    variables: Mapping[str, Any],
    arch: str,
    out_dir: str | Path,
    source_name: str,
    source_sha256: str,
    layout: MobileNetV2Layout | None = None,
) -> Path:
    """Writes ``<arch>.msgpack`` and its manifest ``<arch>.json`` atomically; returns the former."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, manifest_path = converted_paths(arch, out_dir)
    host = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), dict(variables))
    with atomic_path(weights_path) as tmp:
        tmp.write_bytes(flax.serialization.msgpack_serialize(host))
    manifest = {
        "format": MANIFEST_FORMAT,
        "architecture": arch,
        "source_file": source_name,
        "source_sha256": source_sha256,
        "weights_file": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
        "converter": "patchcore_jax.backbones.convert",
        "package_version": package_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if layout is not None:
        manifest["layout"] = layout.to_json()
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return weights_path


def load_converted(arch: str, directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, manifest) of a stored conversion. FileNotFoundError if absent."""
    weights_path, manifest_path = converted_paths(arch, directory)
    for needed in (weights_path, manifest_path):
        if not needed.is_file():
            raise FileNotFoundError(needed)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("architecture") != arch:
        raise ValueError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest for {arch}")
    variables = flax.serialization.msgpack_restore(weights_path.read_bytes())
    return variables, manifest


def convert_weights(source: str | Path, arch: str, out_dir: str | Path | None = None) -> Path:
    """Converts a torchvision/timm ResNet or DenseNet state dict (.safetensors/.pth) or a
    MobileNetV2 .tflite into ``<out_dir>/<arch>.msgpack`` + ``<arch>.json``; returns the
    .msgpack path.

    out_dir defaults to ``weights_dir()``.
    """
    return _convert(Path(source), arch, out_dir, Path(source).name)


def _convert(source: Path, arch: str, out_dir: str | Path | None, source_name: str) -> Path:
    if not source.is_file():
        raise FileNotFoundError(f"weights file {source} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else weights_dir()
    if arch == "mobilenet_v2":
        if source.suffix != ".tflite":
            raise ValueError(f"mobilenet_v2 weights come from a .tflite file, got {source.name}")
        layout, variables = read_tflite(source)
        check_variables(variables, variable_shapes(full_module(arch, layout)), source_name)
    elif arch in RESNET_ARCHITECTURES or arch in DENSENET_ARCHITECTURES:
        if source.suffix not in STATE_DICT_SUFFIXES:
            raise ValueError(
                f"{arch} weights come from one of {STATE_DICT_SUFFIXES}, got {source.name}"
            )
        from_state_dict = (
            resnet_variables_from_state_dict
            if arch in RESNET_ARCHITECTURES
            else densenet_variables_from_state_dict
        )
        layout, variables = None, from_state_dict(read_state_dict(source), full_module(arch))
    else:
        full_module(arch)  # raises the ValueError listing the architectures
    return save_converted(variables, arch, out_dir, source_name, sha256_file(source), layout)


# --------------------------------------------------------------------------- download


def fetch_weights(name: str, out_dir: str | Path | None = None, url: str | None = None) -> Path:
    """Downloads torchvision's ImageNet weights for ``name``, verifies them, and converts them.

    The sha256 must start with the hex digits in the file name (``...-95faca4d.pth``; a ``url``
    whose name has none is checked against torchvision's name). A mismatch raises ValueError and
    leaves nothing behind. The download is converted and then deleted; returns the .msgpack path.
    """
    if name not in TORCHVISION_FILES:
        hint = (
            " (its TFLite file ships with the package; nothing to fetch)"
            if name == "mobilenet_v2"
            else ""
        )
        raise ValueError(f"no download for {name!r}{hint}; fetchable: {tuple(TORCHVISION_FILES)}")
    url = url or TORCHVISION_URL + TORCHVISION_FILES[name]
    file_name = Path(urllib.parse.urlparse(url).path).name or TORCHVISION_FILES[name]
    match = re.search(r"-([0-9a-f]{8,64})\.[a-z]+$", file_name) or re.search(
        r"-([0-9a-f]{8})\.pth$", TORCHVISION_FILES[name]
    )
    expected_prefix = match.group(1)
    out_dir = Path(out_dir) if out_dir is not None else weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{file_name}.", suffix=Path(file_name).suffix or ".pth", dir=out_dir
    )
    os.close(handle)
    download = Path(temporary)
    try:
        digest = download_file(url, download, file_name)
        if not digest.startswith(expected_prefix):
            raise ValueError(
                f"{url}: sha256 {digest} does not start with {expected_prefix}; "
                "the download is corrupt or not the expected file (deleted)"
            )
        return _convert(download, name, out_dir, file_name)
    finally:
        download.unlink(missing_ok=True)
