"""Feature-extracting backbones: Flax modules plus their (converted) ImageNet weights.

Every backbone module takes RGB pixels 0..255 (uint8 or float), [B, H, W, 3], normalises them
with its own constants, and returns an ordered dict {stage name: [B, h, w, C] float32} of the
requested stages in network order (finest grid first), computing nothing after the deepest one.

    backbone = load_backbone("wide_resnet50_2")          # layer2 + layer3
    backbone = probe_batch_norm(backbone, (224, 224))     # the reference's BatchNorm probe
    maps = jax.jit(backbone.module.apply)(backbone.variables, images)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax.backbones.convert import (
    BUNDLED_WEIGHTS,
    MOBILENET_TFLITE,
    TORCHVISION_FILES,
    check_variables,
    convert_weights,
    converted_paths,
    fetch_weights,
    full_module,
    load_converted,
    select_variables,
    sha256_file,
    variable_shapes,
    weights_dir,
)
from patchcore_jax.backbones.convert import weights_dir as _default_weights_dir
from patchcore_jax.backbones.densenet import (
    DENSENET_ARCHITECTURES,
    DENSENET_DEFAULT_LAYERS,
    DENSENET_STAGES,
    densenet,
)
from patchcore_jax.backbones.mobilenet_v2 import (
    DEFAULT_LAYOUT,
    MOBILENET_STAGES,
    MobileNetV2,
    MobileNetV2Layout,
)
from patchcore_jax.backbones.resnet import (
    RESNET_ARCHITECTURES,
    RESNET_STAGES,
    probe_batch_stats,
    resnet,
)
from patchcore_jax.backbones.tflite import read_tflite

__all__ = [
    "Backbone",
    "available_backbones",
    "convert_weights",
    "default_layers",
    "describe_weights",
    "fetch_weights",
    "fetchable_backbones",
    "init_backbone",
    "load_backbone",
    "load_or_init_backbone",
    "probe_batch_norm",
    "probed_statistics",
    "recorded_backbone",
    "restore_probe",
    "stage_names",
    "weights_dir",
    "weights_status",
]

_BACKBONES: tuple[str, ...] = (*RESNET_ARCHITECTURES, "mobilenet_v2", *DENSENET_ARCHITECTURES)
# ``Backbone.weights_sha256`` of ``init_backbone``'s weights (seed 0; other seeds say theirs).
RANDOM_INIT = "random-init"


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A backbone ready to run: module + the variables it needs (only the requested stages').

    Attributes:
      name: registered name, e.g. ``wide_resnet50_2``.
      module: Flax module; ``module.apply(variables, images [B, H, W, 3] uint8/float 0..255)``
        returns {stage: [B, h, w, C] float32} for ``layers``, in network order.
      variables: {'params': ..., 'batch_stats': ...} (whatever the module needs), jax arrays.
      layers: stages the module returns, in network order (finest first).
      weights_sha256: sha256 of the source weights file, or ``RANDOM_INIT`` ("random-init";
        "random-init seed N" for ``init_backbone``'s other seeds).
      probed_image_shape: (H, W) of the reference's BatchNorm probe once ``probe_batch_norm``
        has run, else None (pristine statistics).
    """

    name: str
    module: nn.Module
    variables: dict
    layers: tuple[str, ...]
    weights_sha256: str
    probed_image_shape: tuple[int, int] | None = None

    @property
    def has_batch_stats(self) -> bool:
        """True when the backbone keeps BatchNorm running statistics (the probe changes them)."""
        return bool(self.variables.get("batch_stats"))

    def feature_maps(self, images: jax.Array) -> dict[str, jax.Array]:
        """images: [B, H, W, 3] uint8/float 0..255 -> {stage: [B, h, w, C] float32}.

        Traceable; under ``jax.jit`` prefer ``jax.jit(backbone.module.apply)(backbone.variables,
        images)`` so the weights are arguments, not constants baked into the program.
        """
        return self.module.apply(self.variables, images)


def available_backbones() -> tuple[str, ...]:
    """Registered backbone names; the first is PatchCore's default."""
    return _BACKBONES


def _check_name(name: str) -> None:
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {_BACKBONES}")


def stage_names(name: str) -> tuple[str, ...]:
    """All stages ``name`` can return, in network order."""
    _check_name(name)
    if name in DENSENET_ARCHITECTURES:
        return DENSENET_STAGES
    return MOBILENET_STAGES if name == "mobilenet_v2" else RESNET_STAGES


def default_layers(name: str) -> tuple[str, ...]:
    """The stride-8 and stride-16 stages PatchCore aggregates."""
    _check_name(name)
    if name in DENSENET_ARCHITECTURES:
        return DENSENET_DEFAULT_LAYERS
    return ("stride8", "stride16") if name == "mobilenet_v2" else ("layer2", "layer3")


def _resolve_layers(name: str, layers: Sequence[str] | None) -> tuple[str, ...]:
    """Validated ``layers`` (default pair if None) in network order."""
    if layers is None:
        return default_layers(name)
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of stage names, got the string {layers!r}")
    valid = stage_names(name)
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in valid]
    if unknown or not layers or len(set(layers)) != len(layers):
        raise ValueError(f"invalid layers {layers} for {name}: give distinct names from {valid}")
    return tuple(sorted(layers, key=valid.index))


def _module(name: str, layers: tuple[str, ...], layout: MobileNetV2Layout | None) -> nn.Module:
    if name == "mobilenet_v2":
        return MobileNetV2(layout or DEFAULT_LAYOUT, layers)
    if name in DENSENET_ARCHITECTURES:
        return densenet(name, layers)
    return resnet(name, layers)


def _backbone(
    name: str,
    layers: tuple[str, ...],
    full_variables: dict[str, Any],
    weights_sha256: str,
    layout: MobileNetV2Layout | None = None,
) -> Backbone:
    """Keeps only the variables the requested stages use and puts them on the device."""
    module = _module(name, layers, layout)
    used = select_variables(full_variables, variable_shapes(module))
    variables = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), used)
    return Backbone(name, module, variables, layers, weights_sha256)


def init_backbone(name: str, layers: Sequence[str] | None = None, seed: int = 0) -> Backbone:
    """A backbone with random weights, for tests and benchmarks.

    Kernels are LeCun-normal (Flax's default), biases 0, batch norm the identity (scale 1,
    mean 0, var 1). Drawn with numpy from the shapes alone, so nothing is compiled.
    """
    _check_name(name)
    layers = _resolve_layers(name, layers)
    module = _module(name, layers, None)
    rng = np.random.default_rng(seed)
    constants = {"bias": 0.0, "mean": 0.0, "scale": 1.0, "var": 1.0}

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        leaf_name = path[-1].key
        if leaf_name in constants:
            return jnp.full(leaf.shape, constants[leaf_name], jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        values = rng.standard_normal(leaf.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        return jnp.asarray(values)

    variables = jax.tree_util.tree_map_with_path(draw, variable_shapes(module))
    label = RANDOM_INIT if seed == 0 else f"{RANDOM_INIT} seed {seed}"
    return Backbone(name, module, variables, layers, label)


def probe_batch_norm(backbone: Backbone, image_shape: tuple[int, int]) -> Backbone:
    """The backbone after the reference's one-off BatchNorm probe (README).

    The authors' ``PatchCore.load`` runs the (train-mode) backbone once on a normalised
    ``ones([1, 3, H, W])`` before anything else, which moves every BatchNorm's running
    statistics up to the deepest extracted stage; the published numbers come from the moved
    statistics. Computed eagerly (one forward pass of one image), a pure function of the
    variables: the same weights, layers and ``image_shape`` always give the same statistics.
    Backbones without BatchNorm statistics (the TFLite MobileNetV2, whose BN is folded) come
    back unchanged apart from the record.

    Args:
      backbone: a backbone with pristine statistics (not probed before).
      image_shape: (H, W) of the model's input images.
    """
    if backbone.probed_image_shape is not None:
        raise ValueError(
            f"backbone {backbone.name} was already probed at {backbone.probed_image_shape}; "
            "the reference probes once, on pristine statistics"
        )
    height, width = (int(size) for size in image_shape)
    if height < 1 or width < 1:
        raise ValueError(f"image_shape must be two positive sizes, got {image_shape!r}")
    variables = backbone.variables
    if backbone.has_batch_stats:
        variables = probe_batch_stats(backbone.module, variables, (height, width))
    return dataclasses.replace(backbone, variables=variables, probed_image_shape=(height, width))


def probed_statistics(backbone: Backbone) -> np.ndarray | None:
    """What the probe changed, to store beside a model (``checkpoint``): the running
    statistics' float32 leaves raveled into one vector in tree order; None for a backbone not
    probed, or without (float32) statistics. ``restore_probe`` takes it back."""
    if backbone.probed_image_shape is None or not backbone.has_batch_stats:
        return None
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(backbone.variables["batch_stats"])]
    if any(leaf.dtype != np.float32 for leaf in leaves):
        return None
    return np.concatenate([leaf.ravel() for leaf in leaves])


def restore_probe(
    backbone: Backbone, image_shape: tuple[int, int], statistics: np.ndarray
) -> Backbone:
    """``probe_batch_norm(backbone, image_shape)`` from what that probe computed before
    (``probed_statistics`` of the probed backbone, e.g. a checkpoint's), without running it: a
    model restored this way runs the very statistics its memory bank was made with, on any
    machine, and loading skips an eager forward pass (seconds on a CPU).

    Args:
      backbone: the pristine backbone the statistics were probed from.
      image_shape: (H, W) the probe ran at.
      statistics: ``[S] float32``, as many values as the backbone's running statistics
        (ValueError otherwise).
    """
    if backbone.probed_image_shape is not None:
        raise ValueError(
            f"backbone {backbone.name} was already probed at {backbone.probed_image_shape}; "
            "probed statistics are restored onto pristine ones"
        )
    leaves, structure = jax.tree.flatten(backbone.variables.get("batch_stats", {}))
    sizes = [int(np.size(leaf)) for leaf in leaves]
    statistics = np.asarray(statistics)
    float32 = all(np.asarray(leaf).dtype == np.float32 for leaf in leaves)
    if not leaves or not float32 or statistics.shape != (sum(sizes),):
        raise ValueError(
            f"{statistics.size} probed BatchNorm statistics do not fit backbone {backbone.name} "
            f"{list(backbone.layers)}, which has {sum(sizes)} float32 running statistics"
        )
    parts = np.split(statistics.astype(np.float32), np.cumsum(sizes)[:-1])
    shapes = [np.shape(leaf) for leaf in leaves]
    shaped = [jnp.asarray(part.reshape(shape)) for part, shape in zip(parts, shapes, strict=True)]
    variables = {**backbone.variables, "batch_stats": jax.tree.unflatten(structure, shaped)}
    height, width = (int(size) for size in image_shape)
    return dataclasses.replace(backbone, variables=variables, probed_image_shape=(height, width))


def _missing_weights(name: str, directory: Path) -> FileNotFoundError:
    if name == "mobilenet_v2":
        how = (
            f"put {MOBILENET_TFLITE} there (the package ships it in {BUNDLED_WEIGHTS}, "
            "read when no folder is given), or run "
            "`patchcore-jax weights convert FILE.tflite --arch mobilenet_v2`"
        )
    else:
        how = (
            f"run `patchcore-jax weights fetch {name}` (downloads torchvision's file and "
            f"converts it), or, from a local .pth/.safetensors copy, "
            f"`patchcore-jax weights convert FILE --arch {name}`"
        )
    return FileNotFoundError(
        f"no weights for {name} in {directory} (expected {name}.msgpack + {name}.json); {how}. "
        "To use another folder, set the PATCHCORE_WEIGHTS environment variable to it "
        "(in Python: load_backbone(..., weights_dir=...))."
    )


def _tflite_file(name: str, directory: Path, bundled: bool) -> Path | None:
    """The TFLite file ``mobilenet_v2`` converts: ``directory``'s, else (``bundled``) the
    package's; None for other backbones or when there is none."""
    folders = (directory, BUNDLED_WEIGHTS) if bundled else (directory,)
    paths = [folder / MOBILENET_TFLITE for folder in folders if name == "mobilenet_v2"]
    return next((path for path in paths if path.is_file()), None)


def weights_status(name: str, weights_dir: str | Path | None = None) -> str:
    """Where ``load_backbone(name, weights_dir=weights_dir)`` would read its weights, without
    reading them: ``"converted"`` (``<name>.msgpack`` + ``.json`` in the folder), ``"tflite"``
    (mobilenet_v2's TFLite file, the folder's or the package's) or ``"missing"``."""
    _check_name(name)
    directory = Path(weights_dir) if weights_dir is not None else _default_weights_dir()
    if all(path.is_file() for path in converted_paths(name, directory)):
        return "converted"
    return "tflite" if _tflite_file(name, directory, weights_dir is None) else "missing"


def describe_weights() -> list[str]:
    """Lines for ``patchcore-jax weights list``: the default weights folder, then one line per
    backbone saying where its weights are or the command that gets them."""
    lines = [f"weights folder: {_default_weights_dir()} (another: set PATCHCORE_WEIGHTS)"]
    for name in _BACKBONES:
        get = "fetch" if name in fetchable_backbones() else "convert FILE --arch"
        how = {
            "converted": "converted, in the weights folder",
            "tflite": "the bundled TFLite file (offline)",
            "missing": f"missing: get it with `patchcore-jax weights {get} {name}`",
        }[weights_status(name)]
        lines.append(f"{name:18s} {how}")
    return lines


def fetchable_backbones() -> tuple[str, ...]:
    """Backbones whose ImageNet weights ``fetch_weights`` downloads (torchvision's files)."""
    return tuple(TORCHVISION_FILES)


def load_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    weights_dir: str | Path | None = None,
) -> Backbone:
    """The backbone with its converted ImageNet weights from ``weights_dir`` (default: the
    ``weights_dir()`` function's folder).

    ResNets read ``<name>.msgpack`` + ``<name>.json`` (made by convert/fetch). ``mobilenet_v2``
    reads a converted ``mobilenet_v2.msgpack`` if present, else converts
    ``mobilenet_v2_1.0_224_ptq.tflite`` in memory (well under a second): the folder's, else,
    when ``weights_dir`` is None, the copy shipped with the package (``BUNDLED_WEIGHTS``).
    Raises ValueError for unknown names/layers, FileNotFoundError (naming the command that gets
    the weights) when they are missing.
    """
    _check_name(name)
    layers = _resolve_layers(name, layers)
    directory = Path(weights_dir) if weights_dir is not None else _default_weights_dir()
    try:
        variables, manifest = load_converted(name, directory)
    except FileNotFoundError:
        tflite_path = _tflite_file(name, directory, bundled=weights_dir is None)
        if tflite_path is None:
            raise _missing_weights(name, directory) from None
        layout, variables = read_tflite(tflite_path)
        source, source_sha256 = tflite_path.name, sha256_file(tflite_path)
    else:
        layout = MobileNetV2Layout.from_json(manifest["layout"]) if name == "mobilenet_v2" else None
        source = f"{directory / manifest['weights_file']} (re-run the conversion)"
        source_sha256 = manifest["source_sha256"]
    check_variables(variables, variable_shapes(full_module(name, layout)), source)
    return _backbone(name, layers, variables, source_sha256, layout)


def load_or_init_backbone(name: str, layers: Sequence[str] | None = None) -> Backbone:
    """``load_backbone(name, layers)``, or where its weights are absent ``init_backbone``'s
    random weights, with a warning that scores computed with them mean nothing (smoke runs and
    timings of backbones whose weights cannot be fetched here; the CLI's
    ``--random-init-missing``)."""
    try:
        return load_backbone(name, layers)
    except FileNotFoundError as error:
        warnings.warn(
            f"{str(error).split(';')[0]}: using random-init weights instead; scores and "
            "metrics computed with them mean nothing",
            stacklevel=2,
        )
        return init_backbone(name, layers)


def recorded_backbone(name: str, layers: Sequence[str] | None, weights_sha256: str) -> Backbone:
    """The backbone a checkpoint records: ``init_backbone``'s weights again (a pure function
    of name and layers, with a warning that its scores mean nothing) for ``RANDOM_INIT``, else
    ``load_backbone(name, layers)`` (whose hash the caller checks)."""
    if weights_sha256 != RANDOM_INIT:
        return load_backbone(name, layers)
    warnings.warn(
        f"this model was fitted with random-init {name} weights: its scores mean nothing",
        stacklevel=2,
    )
    return init_backbone(name, layers)


def model_backbone(
    backbone: Backbone | None,
    name: str,
    layers: Sequence[str] | None,
    image_shape: tuple[int, int],
    batch_norm_probe: bool,
) -> Backbone:
    """The backbone a model runs: ``backbone`` (whose name must be ``name``) or the one
    ``load_backbone(name, layers)`` loads, with its BatchNorm statistics probed for
    ``image_shape`` when ``batch_norm_probe`` (unless it already was probed for it: e.g.
    another model's backbone). ValueError for a backbone probed differently."""
    if backbone is None:
        backbone = load_backbone(name, layers)
    elif backbone.name != name:
        raise ValueError(f"backbone {backbone.name!r} does not match config.backbone {name!r}")
    probed = backbone.probed_image_shape
    if batch_norm_probe and probed is None:
        return probe_batch_norm(backbone, image_shape)
    if probed is not None and (not batch_norm_probe or probed != image_shape):
        wanted = image_shape if batch_norm_probe else "no probe"
        raise ValueError(
            f"backbone statistics were probed at {probed}, but this config needs {wanted}; "
            "pass a backbone with pristine statistics"
        )
    return backbone
