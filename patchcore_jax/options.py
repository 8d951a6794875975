"""``PatchCoreConfig`` as command-line options: ``fit`` and ``benchmark`` get one option per
config field that has help text in its metadata, and the parsed options become configs again.

Every generated option defaults to None ("not given"), so a config built from the options takes
its own defaults, and validation stays in ``PatchCoreConfig.__post_init__``; ``in_option_words``
puts a config's error message in the command line's words.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any

from patchcore_jax.config import PRESETS, PatchCoreConfig, member_configs, preset_values
from patchcore_jax.image_reader import ImageReader, default_workers


def image_size(text: str) -> tuple[int, int]:
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected H,W (two positive integers, e.g. 224,448) or one size, got {text!r}"
        )
    return (sizes[0], sizes[-1])


def names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b") (categories, stage names)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def member_layers(text: str) -> tuple[tuple[str, ...], ...]:
    """``a,b`` (every member) or ``a,b;c,d`` (one group per ensemble member)."""
    return tuple(names(group) for group in text.split(";"))


def option_fields() -> list[dataclasses.Field]:
    """The ``PatchCoreConfig`` fields that are command-line options (those with help text)."""
    return [f for f in dataclasses.fields(PatchCoreConfig) if "help" in f.metadata]


def flags(field: dataclasses.Field) -> tuple[str, ...]:
    """A field's option strings: its historic flag first, then one named after the field."""
    own = "--" + field.name.replace("_", "-")
    if field.default is True:
        own = "--no-" + own[2:]
    flag = field.metadata["flag"]
    return (flag, own) if flag else (own,)


def _parsing(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse's ``type``/``choices``/``action`` for a field, from its default and type."""
    if field.name == "layers":
        return {"type": member_layers}
    if isinstance(field.default, bool):
        return {"action": "store_false" if field.default else "store_true"}
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": typing.get_args(hint)}
    kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
    return {"type": kinds[0], "metavar": flags(field)[0][2:].upper().replace("-", "_")}


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    if not isinstance(field.default, bool) and "default" not in text:
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def add_model_options(
    parser: argparse.ArgumentParser, presets: dict[str, object] | None = None
) -> argparse._ArgumentGroup:
    """``--preset`` and one option per config field (every option's default is None: "not
    given", so the config's own default applies). Returns the calibration group."""
    model = parser.add_argument_group("model (defaults: the authors' reference settings)")
    model.add_argument(
        "--preset",
        default=None,
        metavar="NAME[,NAME]",
        help=f"the paper's other settings (README): {', '.join(PRESETS)}; comma-separated "
        "presets combine, options given explicitly override them",
    )
    model.add_argument(
        "--random-init-missing",
        action="store_true",
        help="backbones whose weights are absent run with random-init weights instead of "
        "failing (smoke runs and timings: the scores and metrics then mean nothing)",
    )
    groups = {
        "model": model,
        "calibration": parser.add_argument_group(
            "calibration (decision thresholds without defect images; see README)"
        ),
    }
    hints = typing.get_type_hints(PatchCoreConfig)
    for field in option_fields():
        group = groups[field.metadata["group"]]
        if field.name == "crop":
            group = group.add_mutually_exclusive_group()
        parsing = _parsing(field, hints[field.name])
        group.add_argument(
            *flags(field), dest=field.name, default=None, help=_help(field), **parsing
        )
        if field.name == "crop":
            group.add_argument(
                "--image-size",
                type=image_size,
                default=None,
                metavar="H,W",
                help="model input height,width in pixels: the centre crop (shorter-side mode) "
                "or the whole resized image (stretch mode); anomaly maps have this size",
            )
    if presets:
        parser.set_defaults(**presets)
    return groups["calibration"]


def preset_defaults(names: str) -> dict[str, object]:
    """The presets' values as option defaults (explicit options still override them)."""
    defaults = dict(preset_values(names))
    layers = defaults.get("layers")
    if layers is not None and all(isinstance(layer, str) for layer in layers):
        defaults["layers"] = (tuple(layers),)  # one group for every member
    return defaults


def _calibration_choice(args: argparse.Namespace) -> str | None:
    """--calibration, --held-out-fraction and --validation as one config value (None: the
    config's default)."""
    if getattr(args, "validation", None) is not None:  # benchmark has no --validation
        if args.calibration not in (None, "none") or args.calibration_fraction is not None:
            raise ValueError(
                "--validation calibrates on its own folder; drop --calibration/--held-out-fraction"
            )
        return "none"  # the bank is fitted alone; the validation set calibrates it afterwards
    if args.calibration_fraction is not None:
        if args.calibration not in (None, "held-out"):
            raise ValueError("--held-out-fraction needs --calibration held-out (or none given)")
        return "held-out"
    return args.calibration


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the options (and presets) give, by field name: ``--image-size`` as
    ``crop``, the calibration choice as ``calibration``, ``backbone`` and ``layers`` as parsed
    (one or several members)."""
    values = {field.name: getattr(args, field.name) for field in option_fields()}
    if args.image_size is not None:
        values["crop"] = args.image_size
    values["calibration"] = _calibration_choice(args)
    return {name: value for name, value in values.items() if value is not None}


def resume_values(args: argparse.Namespace) -> dict[str, Any]:
    """``given_values`` for the one fitted model that ``fit --resume`` extends (its options
    cannot change: ``workflows.extend_folder`` refuses those that differ)."""
    if getattr(args, "validation", None) is not None:
        raise ValueError(
            "--validation cannot be used with --resume (the model keeps its calibration)"
        )
    values = given_values(args)
    if len(values.get("layers", ())) == 1:
        values["layers"] = values["layers"][0]
    return values


def configs_from_args(args: argparse.Namespace) -> list[PatchCoreConfig]:
    """One config per backbone of ``--backbone a,b`` (more than one: an ensemble), from the
    options given (the config's defaults for the others; ``config.member_configs``)."""
    return member_configs(given_values(args))


def model_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``{"configs": configs_from_args(args), "backbones": ...}`` for ``workflows.fit_folder``
    and ``benchmark.run_benchmark``: with ``--random-init-missing`` each member's backbone
    (``load_or_init_backbone``: random-init where its weights are absent, with a warning),
    else None (the models load theirs and fail on missing weights)."""
    configs = configs_from_args(args)
    if not getattr(args, "random_init_missing", False):
        return {"configs": configs, "backbones": None}
    from patchcore_jax.backbones import load_or_init_backbone

    backbones = [load_or_init_backbone(config.backbone, config.layers) for config in configs]
    return {"configs": configs, "backbones": backbones}


def in_option_words(message: str, args: argparse.Namespace) -> str:
    """A config error in the command line's words: ``PatchCoreConfig.seed must be ...`` becomes
    ``--seed: expected ...``, ``crop (300)`` becomes ``--crop 300`` (or ``--image-size``)."""
    for field in option_fields():
        flag = flags(field)[0]
        if field.name == "crop" and getattr(args, "image_size", None) is not None:
            flag = "--image-size"
        name = rf"(?:PatchCoreConfig\.)?\b{field.name}\b"
        message = message.replace(f"PatchCoreConfig.{field.name} must be ", f"{flag}: expected ")
        message = re.sub(rf"{name} \((\d+|\(\d+, \d+\))\)", rf"{flag} \1", message)
        message = re.sub(rf"{name} '([^']*)'", rf"{flag} \1", message)
        message = re.sub(rf"PatchCoreConfig\.{field.name}\b", flag, message)
    return message


def _integer(text: str, smallest: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = smallest - 1
    if value < smallest:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _count(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _index(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """How a command runs (``fit``, ``evaluate``, ``predict``, ``benchmark``): the mesh, the
    progress bars, the compilation cache, how images are read (``image_reader``) and
    ``--distributed`` with the values that ``jax.distributed.initialize`` otherwise detects."""
    from patchcore_jax import sharding  # jax: not imported with this module (image workers)

    parser.add_argument(
        "--bank-shards",
        type=_count,
        default=1,
        help="devices that split the memory bank during scoring (default: 1, "
        "i.e. purely data-parallel)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--compile-cache",
        default=sharding.default_compile_cache(),
        metavar="DIR",
        help="folder of JAX's persistent compilation cache, so a later run with the same "
        "shapes skips compilation; 'off' disables it (default: $PATCHCORE_COMPILE_CACHE or "
        "%(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=_index,
        default=default_workers(),
        metavar="N",
        help="processes that decode, resize and crop the images; 0: threads of this process "
        "(default: the available CPUs but one, at most 8; 0 below 4 CPUs: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="decoded-crop cache: keep each image's uint8 crop here (keyed by the file's "
        "content and the resize/crop options), so a later run decodes none (default: no cache)",
    )
    group = parser.add_argument_group(
        "many hosts (README: each process reads its share of the images; process 0 writes)"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="run as one process of a multi-process job (one per host, all with the same "
        "command line): the coordinator, number of processes and process id are detected on "
        "SLURM, Open MPI and Cloud TPU, or given by the options below",
    )
    group.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address and a port"
    )
    group.add_argument(
        "--num-processes", type=_count, default=None, metavar="N", help="processes in the job"
    )
    group.add_argument(
        "--process-id", type=_index, default=None, metavar="I", help="this process: 0 .. N-1"
    )


def distributed_arguments(args: argparse.Namespace) -> dict[str, Any] | None:
    """The keyword arguments of ``sharding.initialize_distributed`` for ``--distributed``
    (those given; the others are detected), or None without it."""
    given = {
        "coordinator_address": getattr(args, "coordinator", None),
        "num_processes": getattr(args, "num_processes", None),
        "process_id": getattr(args, "process_id", None),
    }
    given = {name: value for name, value in given.items() if value is not None}
    if not getattr(args, "distributed", False):
        if given:
            raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
        return None
    if given.get("process_id", 0) >= given.get("num_processes", float("inf")):
        raise ValueError(
            f"--process-id {given['process_id']}: expected 0 .. {given['num_processes'] - 1} "
            f"(--num-processes {given['num_processes']})"
        )
    return given


def image_reader(args: argparse.Namespace) -> ImageReader:
    """The ``ImageReader`` of ``--workers`` and ``--cache-dir``."""
    return ImageReader(workers=args.workers, cache_dir=args.cache_dir)
