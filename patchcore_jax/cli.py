"""The ``patchcore-jax`` command: thin argument parsing over the library API.

patchcore-jax fit DATA --out MODEL [options]
patchcore-jax predict MODEL IMAGE_OR_FOLDER... --out DIR [--masks]
patchcore-jax evaluate MODEL DATA [--out DIR]
patchcore-jax export MODEL --out FILE [--platforms cpu,cuda,tpu]
patchcore-jax benchmark ROOT --out DIR [model options] [--categories a,b] [--train-images N]
patchcore-jax split --good DIR --defect [NAME=]DIR ... --out ROOT
patchcore-jax data fetch mvtec-ad [--categories a,b] [--out DIR]
patchcore-jax weights convert FILE --arch NAME | weights fetch NAME | weights list
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchcore_jax.config import (
    CALIBRATIONS,
    CORESET_METHODS,
    DISTANCES,
    NON_SPATIAL_STAGES,
    PRECISIONS,
    RESIZE_MODES,
    SAMPLERS,
    SEED_LIMIT,
    PatchCoreConfig,
    preset_values,
)

PROG = "patchcore-jax"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _neighbourhood_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2 (m* and at least one other bank row), got {text!r}"
        )
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of MB >= 0, got {text!r}")
    return value


def _image_size(text: str) -> tuple[int, int]:
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


def _mask_threshold(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..255, got {text!r}")
    return value


def _platforms(text: str) -> tuple[str, ...]:
    platforms = tuple(name.strip() for name in text.split(",") if name.strip())
    known = ("cpu", "cuda", "tpu")
    if not platforms or any(name not in known for name in platforms):
        raise argparse.ArgumentTypeError(f"expected names among {','.join(known)}, got {text!r}")
    return platforms


def _layers(text: str) -> tuple[str, ...]:
    layers = tuple(name.strip() for name in text.split(",") if name.strip())
    if not layers:
        raise argparse.ArgumentTypeError("expected comma-separated stage names, e.g. layer2,layer3")
    flat = [name for name in layers if name in NON_SPATIAL_STAGES]
    if flat:
        raise argparse.ArgumentTypeError(
            f"{flat[0]!r} has no spatial grid; give feature-map stages, e.g. layer2,layer3 "
            "(ResNets) or stride8,stride16 (mobilenet_v2)"
        )
    return layers


def _member_layers(text: str) -> tuple[tuple[str, ...], ...]:
    """``a,b`` (every member) or ``a,b;c,d`` (one group per ensemble member)."""
    return tuple(_layers(group) for group in text.split(";"))


def _preset(text: str) -> str:
    try:
        preset_values(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Config fields that presets set, and the command-line option (dest) that carries each.
_PRESET_DESTS = {
    "backbone": "backbone",
    "layers": "layers",
    "resize": "resize",
    "crop": "crop",
    "coreset_fraction": "coreset_fraction",
    "reweight": "reweight",
    "reweight_neighbors": "reweight_neighbors",
    "target_embed_dimension": "target_dim",
    "pretrain_embed_dimension": "pretrain_dim",
    "num_neighbors": "k",
}


def _preset_defaults(names: str) -> dict[str, object]:
    """The presets' values as option defaults (explicit options still override them)."""
    defaults: dict[str, object] = {}
    for name, value in preset_values(names).items():
        if name == "layers":
            value = (tuple(value),)
        defaults[_PRESET_DESTS[name]] = value
    return defaults


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist")
    return path


def _output_dir(text: str) -> Path:
    """An output folder: absent (created later) or a folder, never an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected an output folder")
    return path


def _format_score(score: float) -> str:
    """Six significant digits; -0 prints as 0 (a score is never negative), NaN as nan."""
    return f"{float(score) + 0.0:.6g}"


def _add_model_options(
    parser: argparse.ArgumentParser, presets: dict[str, object] | None = None
) -> None:
    defaults = PatchCoreConfig()
    group = parser.add_argument_group("model (defaults: the authors' reference settings)")
    group.add_argument(
        "--preset",
        type=_preset,
        default=None,
        metavar="NAME[,NAME]",
        help="the paper's other settings (README): im320, layers123, wrn101, coreset-25, "
        "coreset-10, coreset-1, reweight, ensemble-d384; comma-separated presets combine, "
        "options given explicitly override them",
    )
    group.add_argument(
        "--backbone",
        default=defaults.backbone,
        help="backbone: wide_resnet50_2 (paper; needs `weights fetch`), resnet18, "
        "resnet50, wide_resnet101_2, or mobilenet_v2 (bundled, offline); several "
        "comma-separated backbones make an ensemble (default: %(default)s)",
    )
    group.add_argument(
        "--layers",
        type=_member_layers,
        default=None,
        help="comma-separated backbone stages to aggregate, for every ensemble member or one "
        "';'-separated group per member, e.g. 'layer2,layer3;stride8,stride16' "
        "(default: the backbone's stride-8 and stride-16 stages)",
    )
    group.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=defaults.resize_mode,
        help="shorter-side: resize the shorter side to --resize, then centre-crop (the "
        "reference); stretch: resize the whole image to --image-size, aspect ratio not kept, "
        "nothing cut away (default: %(default)s)",
    )
    group.add_argument(
        "--resize",
        type=_positive_int,
        default=defaults.resize,
        help="shorter image side after resizing, pixels; shorter-side mode only "
        "(default: %(default)s)",
    )
    size = group.add_mutually_exclusive_group()
    size.add_argument(
        "--crop",
        type=_positive_int,
        default=None,
        help=f"square model input (crop or stretch) size, pixels (default: {defaults.crop})",
    )
    size.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        metavar="H,W",
        help="model input height,width in pixels: the centre crop (shorter-side mode) or "
        "the whole resized image (stretch mode); anomaly maps have this size",
    )
    group.add_argument(
        "--no-batch-norm-probe",
        dest="batch_norm_probe",
        action="store_false",
        help="keep the backbone's pristine eval-mode BatchNorm statistics instead of the "
        "reference's one-off train-mode probe (see README)",
    )
    group.add_argument(
        "--mask-threshold",
        type=_mask_threshold,
        default=defaults.mask_threshold,
        help="ground-truth masks that are not 0/255 are binarised at this value "
        "(>= is a defect) (default: %(default)s)",
    )
    group.add_argument(
        "--pretrain-dim",
        type=_positive_int,
        default=defaults.pretrain_embed_dimension,
        help="per-layer patch feature length (default: %(default)s)",
    )
    group.add_argument(
        "--target-dim",
        type=_positive_int,
        default=defaults.target_embed_dimension,
        help="final patch feature length (default: %(default)s)",
    )
    group.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=defaults.sampler,
        help="memory-bank subsampling (default: %(default)s)",
    )
    group.add_argument(
        "--coreset-fraction",
        type=_fraction,
        default=defaults.coreset_fraction,
        help="fraction of patches kept in the memory bank (default: %(default)s)",
    )
    group.add_argument(
        "--coreset-method",
        choices=CORESET_METHODS,
        default=defaults.coreset_method,
        help="greedy coreset algorithm; all select the same rows (default: %(default)s, "
        "the faster for the bank size)",
    )
    group.add_argument(
        "--k",
        type=_positive_int,
        default=defaults.num_neighbors,
        help="nearest neighbours averaged per patch score (default: %(default)s)",
    )
    group.add_argument(
        "--distance",
        choices=DISTANCES,
        default=defaults.distance,
        help="patch score distance (default: %(default)s, as the reference)",
    )
    group.add_argument(
        "--reweight", action="store_true", help="apply the paper's Eq. 7 image-score reweighting"
    )
    group.add_argument(
        "--reweight-neighbors",
        type=_neighbourhood_size,
        default=defaults.reweight_neighbors,
        help="b >= 2, bank neighbourhood of the reweighting; its weights use Euclidean "
        "distances whatever --distance is (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=_seed,
        default=defaults.seed,
        help="seed of the coreset projection, start points and random sampler "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help="images per backbone batch (default: %(default)s)",
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="exact: float32 everywhere (the reference numerics); fast: the backend's fastest "
        "approximation, k-NN candidates re-ranked in float32 (GPU/TPU: bfloat16 backbone and "
        "candidates; CPU: float32 backbone, low-rank candidates; scores agree closely, not bit "
        "for bit: README) (default: %(default)s)",
    )
    if presets:
        parser.set_defaults(**presets)


def _add_few_shot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train-images",
        type=_positive_int,
        default=None,
        metavar="N",
        help="few-shot protocol: fit on N training images drawn with numpy "
        "default_rng(--train-seed) from the sorted training list (the same subset for every "
        "backbone and run) (default: all)",
    )
    parser.add_argument(
        "--train-seed",
        type=_seed,
        default=0,
        help="seed of the --train-images draw (default: %(default)s)",
    )


def _add_calibration_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Options that choose how decision thresholds are calibrated (fit and benchmark)."""
    defaults = PatchCoreConfig()
    calibration = parser.add_argument_group(
        "calibration (decision thresholds without defect images; see README)"
    )
    calibration.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=None,
        help="self-excluded: score each training image against the bank without its own rows "
        "(bank unchanged; the default); held-out: keep --held-out-fraction of the training "
        "images out of the bank and score them; none: no thresholds",
    )
    calibration.add_argument(
        "--held-out-fraction",
        type=_fraction,
        default=None,
        help="fraction of the training images held out (implies --calibration held-out; "
        f"default {defaults.calibration_fraction})",
    )
    calibration.add_argument(
        "--threshold-quantile",
        type=_fraction,
        default=defaults.threshold_quantile,
        help="thresholds are this quantile of the nominal calibration scores "
        "(default: %(default)s)",
    )
    return calibration


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bank-shards",
        type=_positive_int,
        default=1,
        help="devices that split the memory bank during scoring (default: 1, "
        "i.e. purely data-parallel)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("PATCHCORE_COMPILE_CACHE", str(_default_compile_cache())),
        metavar="DIR",
        help="folder of JAX's persistent compilation cache, so a later run with the same "
        "shapes skips compilation; 'off' disables it (default: $PATCHCORE_COMPILE_CACHE or "
        "%(default)s)",
    )


def _default_compile_cache() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "patchcore-jax" / "xla"


def _enable_compile_cache(folder: str) -> None:
    """Turns on JAX's persistent compilation cache in ``folder`` (every program is cached)."""
    if folder == "off":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_parser(presets: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The command's parser; ``presets`` (``_preset_defaults``) become model option defaults."""
    from patchcore_jax.version import package_version

    parser = _Parser(prog=PROG, description="PatchCore anomaly detection in JAX.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = commands.add_parser(
        "fit",
        help="fit a model on the nominal training images of DATA",
        description="Fit a PatchCore memory bank on DATA's nominal "
        "images (DATA/train/good, or DATA/train) and save it.",
    )
    fit.add_argument(
        "data",
        type=_existing_dir,
        help="dataset folder (MVTec AD layout: only train/ is read) or a folder of good images",
    )
    fit.add_argument(
        "--out", default=None, help="checkpoint folder to write (required without --resume)"
    )
    fit.add_argument(
        "--resume",
        default=None,
        metavar="MODEL",
        help="add DATA's training images to this fitted model instead of fitting anew: the "
        "coreset selection continues from its bank (model options come from MODEL); --out "
        "defaults to MODEL, replaced atomically",
    )
    _add_model_options(fit, presets)
    fit.add_argument(
        "--feature-memory",
        type=_megabytes,
        default=None,
        metavar="MB",
        help="patch features kept resident while the coreset is selected: on the device if "
        "they fit, else on the host, else spilled to a temporary file (the results do not "
        "change; default: a quarter of the device memory, else of the host memory)",
    )
    fit.add_argument(
        "--spill-dir",
        default=None,
        metavar="DIR",
        help="folder of the temporary spill file (default: the system's temporary folder)",
    )
    _add_few_shot_options(fit)
    calibration = _add_calibration_options(fit)
    calibration.add_argument(
        "--validation",
        type=_existing_dir,
        default=None,
        metavar="DIR",
        help="calibrate on this folder instead: MVTec layout (DIR/test, DIR/ground_truth; "
        "F1-optimal thresholds) or a folder of good images (quantile thresholds)",
    )
    _add_run_options(fit)

    predict = commands.add_parser(
        "predict",
        help="score images with a fitted model",
        description="Score images; writes scores.csv (raw and normalised score, decision) and, "
        "per image, a heatmap PNG (and with --masks a defect mask) into --out.",
    )
    predict.add_argument("model", help="checkpoint folder written by `fit`")
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument(
        "--out", required=True, type=_output_dir, help="output folder (created if missing)"
    )
    predict.add_argument("--no-heatmaps", action="store_true", help="write no heatmap PNGs")
    predict.add_argument(
        "--masks",
        action="store_true",
        help="write binary defect masks (PNG, 255 = defect, at the calibrated pixel threshold) "
        "into masks/",
    )
    predict.add_argument(
        "--recursive", action="store_true", help="also take images in sub-folders of folders"
    )
    predict.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous results in --out (only a folder patchcore-jax wrote)",
    )
    _add_run_options(predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="MVTec AD metrics of a model on DATA/test",
        description="Score DATA/test; print and write metrics.json, per_image.csv and heatmaps.",
    )
    evaluate.add_argument("model", help="checkpoint folder written by `fit`")
    evaluate.add_argument("data", type=_existing_dir, help="dataset folder (MVTec AD layout)")
    evaluate.add_argument(
        "--out",
        default=None,
        type=_output_dir,
        help="output folder (default: MODEL_evaluation beside the model, which stays untouched)",
    )
    evaluate.add_argument("--no-heatmaps", action="store_true", help="skip heatmap PNGs")
    evaluate.add_argument(
        "--mask-threshold",
        type=_mask_threshold,
        default=None,
        help="binarise masks that are not 0/255 at this value (default: the model's, 128)",
    )
    evaluate.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="accept defect images without a mask; they are left out of the pixel metrics",
    )
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous results in --out (only a folder patchcore-jax wrote)",
    )
    _add_run_options(evaluate)

    export = commands.add_parser(
        "export",
        help="serialise a model's inference for deployment (jax.export, StableHLO)",
        description="Write MODEL's whole inference (uint8 crops -> image scores, normalised "
        "scores, decisions, anomaly maps; weights and memory bank included, any batch size) "
        "to FILE; run it with patchcore_jax.exported.load(FILE), which needs only jax and numpy.",
    )
    export.add_argument("model", help="checkpoint folder written by `fit` (calibrated)")
    export.add_argument("--out", required=True, metavar="FILE", help="export file to write")
    export.add_argument(
        "--platforms",
        type=_platforms,
        default=None,
        help="comma-separated among cpu,cuda,tpu (default: cpu and each other platform that "
        "lowers on this machine)",
    )

    benchmark = commands.add_parser(
        "benchmark",
        help="fit and evaluate every category of an MVTec AD root",
        description="Fit and evaluate every category folder of ROOT; write results.csv (the "
        "authors' columns), results.md and timings.csv into --out, and each category's "
        "result.json in --out/<category>/. A rerun reuses finished categories.",
    )
    benchmark.add_argument("root", type=_existing_dir, help="folder of category folders")
    benchmark.add_argument(
        "--out", required=True, type=_output_dir, help="results folder (created if missing)"
    )
    benchmark.add_argument(
        "--categories",
        type=_layers,
        default=None,
        metavar="a,b",
        help="comma-separated categories to run (default: every category folder of ROOT)",
    )
    benchmark.add_argument(
        "--recompute", action="store_true", help="recompute categories finished before"
    )
    _add_model_options(benchmark, presets)
    _add_few_shot_options(benchmark)
    _add_calibration_options(benchmark)
    _add_run_options(benchmark)

    split = commands.add_parser(
        "split",
        help="build the MVTec AD layout from unsplit folders",
        description="Build ROOT/{train/good, test/good, test/<defect>, ground_truth/<defect>} "
        "from folders of defect-free images and folders of defect images with their masks "
        "(beside them, as <stem>_mask.<ext> or as <stem>.png next to a non-PNG image, or in "
        "--mask-dir). A seeded --train-fraction of the good images goes to train/good, the "
        "rest to test/good. Files are linked (or copied); the sources are never modified.",
    )
    split.add_argument(
        "--good",
        type=_existing_dir,
        action="append",
        required=True,
        help="folder of defect-free images (repeatable)",
    )
    split.add_argument(
        "--defect",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="folder of defect images of one type; NAME defaults to the folder's name (repeatable)",
    )
    split.add_argument(
        "--mask-dir",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="masks of a defect type in their own folder, named <stem>.<ext> or "
        "<stem>_mask.<ext> (repeatable; default: beside the images)",
    )
    split.add_argument("--out", required=True, help="dataset folder to create (must not exist)")
    split.add_argument(
        "--train-fraction",
        type=_fraction,
        default=0.8,
        help="fraction of the good images used for training (default: %(default)s)",
    )
    split.add_argument(
        "--seed", type=int, default=0, help="seed of the train/test draw (default: 0)"
    )
    split.add_argument("--copy", action="store_true", help="copy files instead of linking to them")

    data_parser = commands.add_parser("data", help="download public datasets")
    data_commands = data_parser.add_subparsers(
        dest="data_command", required=True, parser_class=_Parser
    )
    fetch_data = data_commands.add_parser(
        "fetch",
        help="download, verify and unpack a dataset",
        description="Download the official MVTec AD archive (about 5 GB), check its sha256, "
        "and unpack the requested categories (each complete or not at all).",
    )
    fetch_data.add_argument("dataset", choices=("mvtec-ad",), help="the dataset to fetch")
    fetch_data.add_argument(
        "--categories",
        type=_layers,
        default=None,
        metavar="a,b",
        help="comma-separated categories (default: all 15)",
    )
    fetch_data.add_argument(
        "--out", default="mvtec_ad", help="folder for <category>/ folders (default: %(default)s)"
    )
    fetch_data.add_argument(
        "--url", default=None, help="a mirror or local file:// copy of the official archive"
    )
    fetch_data.add_argument(
        "--sha256", default=None, help="expected sha256 of --url (default: the official one)"
    )

    weights = commands.add_parser("weights", help="convert or download backbone weights")
    weight_commands = weights.add_subparsers(
        dest="weights_command", required=True, parser_class=_Parser
    )
    convert = weight_commands.add_parser(
        "convert", help="convert a torchvision/timm (.pth, .safetensors) or TFLite file"
    )
    convert.add_argument("file", help="weights file to convert")
    convert.add_argument("--arch", required=True, help="architecture, e.g. wide_resnet50_2")
    convert.add_argument("--out-dir", default=None, help="weights folder (default: the project's)")
    fetch = weight_commands.add_parser(
        "fetch", help="download torchvision's ImageNet weights, verify and convert them"
    )
    fetch.add_argument("name", help="architecture, e.g. wide_resnet50_2")
    fetch.add_argument("--out-dir", default=None, help="weights folder (default: the project's)")
    weight_commands.add_parser("list", help="list backbones and whether their weights are here")
    return parser


# ---------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(total: int, description: str, quiet: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=quiet, file=sys.stderr)


def _mesh(bank_shards: int):
    from patchcore_jax import sharding

    return sharding.make_mesh(bank_shards)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from patchcore_jax.files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _image_options(config: PatchCoreConfig) -> dict:
    """The preprocessing arguments of ``config`` (``preprocess.load_image`` & co.)."""
    return {"resize": config.resize, "crop": config.crop, "resize_mode": config.resize_mode}


def _score_paths(model, paths: Sequence[Path], quiet: bool, keep_images: bool):
    """Scores image files batch by batch.

    Returns (image_scores [N], anomaly_maps [N, H, W], the uint8 crops [N, H, W, 3] if
    ``keep_images`` (for the heatmaps, so no image is decoded twice) else None).
    """
    from patchcore_jax import preprocess

    config = model.config
    images = []

    def remembered(batches):
        for batch in batches:
            if keep_images:
                images.append(batch)
            yield batch

    # Per member: an ensemble scores the whole set with each member (its normalisation).
    with _progress(len(paths) * len(model.members), "scoring", quiet) as bar:
        batches = preprocess.iter_image_batches(paths, config.batch_size, **_image_options(config))
        scores, maps = model.predict(remembered(batches), progress=bar.update)
    return scores, maps, (np.concatenate(images) if keep_images else None)


def _format_score(score: float) -> str:
    """Scores as text: 6 significant digits, never "-0"."""
    return f"{float(score) + 0.0:.6g}"


def _output_names(entries: Sequence[str], recursive: bool) -> tuple[list[Path], list[str]]:
    """The images of the command line's files and folders, and a unique output name for each.

    A folder's images are named by their path relative to the folder, under the folder's own
    name (``good/000.png``); a file by its name. If two arguments would give the same name, every
    name gets its argument's position as a prefix (``2/good/000.png``).
    """
    from patchcore_jax.datasets import folders

    paths, names, positions = [], [], []
    for position, entry in enumerate(entries, start=1):
        entry_path = Path(entry)
        if entry_path.is_dir():
            found = folders.image_paths([entry_path], recursive=recursive)
            base = Path(entry_path.absolute().name)
            names += [(base / path.relative_to(entry_path)).as_posix() for path in found]
        else:
            found = folders.image_paths([entry_path])
            names.append(entry_path.name)
        paths += found
        positions += [position] * len(found)
    if len(set(names)) != len(names):
        names = [f"{position}/{name}" for position, name in zip(positions, names, strict=True)]
    return paths, names


def _heatmap_names(names: Sequence[str]) -> list[str]:
    """``x.jpg`` -> ``x.png``; the full name plus ``.png`` where that would clash."""
    stems = [str(Path(name).with_suffix(".png")) for name in names]
    return [
        stem if stems.count(stem) == 1 else f"{name}.png"
        for stem, name in zip(stems, names, strict=True)
    ]


def _save_heatmaps(
    out_dir: Path, names, paths, images, scores, maps, masks, quiet: bool
) -> list[str]:
    """One PNG per image under ``out_dir`` (named after ``names``), colour scale shared over
    the set (min-max of all maps); returns the PNG paths relative to ``out_dir.parent``."""
    from patchcore_jax import viz
    from patchcore_jax.files import OUTPUT_MARKER

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUTPUT_MARKER).touch()  # never read back as data, wherever --out points
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    written = []
    with _progress(len(paths), "heatmaps", quiet) as bar:
        for index, (name, path) in enumerate(zip(_heatmap_names(names), paths, strict=True)):
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            viz.save_anomaly_figure(
                target,
                images[index],
                maps[index],
                mask=masks[index],
                score=float(scores[index]),
                title=str(path),
                vmin=vmin,
                vmax=vmax,
            )
            written.append(target.relative_to(out_dir.parent).as_posix())
            bar.update(1)
    return written


def _contour_mask(path: Path, config: PatchCoreConfig) -> np.ndarray | None:
    """The ground truth beside an MVTec-layout image, for the heatmap contour only: a mask that
    cannot be used costs the contour and a warning, never the run."""
    from patchcore_jax import preprocess
    from patchcore_jax.datasets import folders

    try:
        mask_path = folders.find_mask(path)
        if mask_path is None:
            return None
        return preprocess.load_mask(
            mask_path, **_image_options(config), image_path=path, threshold=config.mask_threshold
        )
    except (ValueError, OSError) as error:
        warnings.warn(
            f"heatmap of {path} drawn without its ground-truth contour: {error}", stacklevel=2
        )
        return None


# ---------------------------------------------------------------------------- commands


def _calibration_choice(args: argparse.Namespace) -> str:
    """--calibration, --held-out-fraction and --validation as one config value."""
    if getattr(args, "validation", None) is not None:  # benchmark has no --validation
        if args.calibration not in (None, "none") or args.held_out_fraction is not None:
            raise ValueError(
                "--validation calibrates on its own folder; drop --calibration/--held-out-fraction"
            )
        return "none"  # the bank is fitted alone; the validation set calibrates it afterwards
    if args.held_out_fraction is not None:
        if args.calibration not in (None, "held-out"):
            raise ValueError("--held-out-fraction needs --calibration held-out (or none given)")
        return "held-out"
    return args.calibration or "self-excluded"


def _validation_set(folder: Path, config: PatchCoreConfig):
    """(paths, labels or None, masks or None) of a --validation folder: MVTec layout (labelled,
    with masks) if it has test/, else its good images (train/good, train/ or the folder)."""
    from patchcore_jax import preprocess
    from patchcore_jax.datasets import folders

    if not (folder / "test").is_dir():
        return folders.load_train_paths(folder), None, None
    dataset = folders.load_dataset(folder, train=False)
    folders.validate_masks(dataset)
    paths = dataset.test_image_paths
    masks = preprocess.load_masks(
        dataset.test_mask_paths,
        **_image_options(config),
        image_paths=paths,
        threshold=config.mask_threshold,
    )
    return paths, dataset.test_labels, masks


def _counted(batches, bar):
    """Passes ``batches`` through, advancing ``bar`` by each batch's size."""
    for batch in batches:
        yield batch
        bar.update(len(batch))


def _configs(args: argparse.Namespace) -> list[PatchCoreConfig]:
    """One config per backbone of ``--backbone a,b`` (more than one: an ensemble)."""
    backbones = [name.strip() for name in args.backbone.split(",") if name.strip()]
    if not backbones:
        raise ValueError("--backbone: expected one or more comma-separated backbone names")
    layers = args.layers or (None,)
    if len(layers) == 1:
        layers = layers * len(backbones)
    elif len(layers) != len(backbones):
        raise ValueError(
            f"--layers gives {len(layers)} ';'-separated groups for {len(backbones)} backbones; "
            "give one group per backbone, or one for all"
        )
    image_size = args.image_size or args.crop or PatchCoreConfig.crop
    if args.resize_mode == "shorter-side" and np.max(image_size) > args.resize:
        option = "--image-size" if args.image_size else "--crop"
        raise ValueError(
            f"{option} {image_size} must not exceed --resize {args.resize} with --resize-mode "
            "shorter-side (the crop is cut from the resized image); use --resize-mode stretch "
            "to resize whole images to --image-size"
        )
    common = dict(
        resize_mode=args.resize_mode,
        resize=args.resize,
        crop=image_size,
        batch_norm_probe=args.batch_norm_probe,
        mask_threshold=args.mask_threshold,
        pretrain_embed_dimension=args.pretrain_dim,
        target_embed_dimension=args.target_dim,
        sampler=args.sampler,
        coreset_fraction=args.coreset_fraction,
        coreset_method=args.coreset_method,
        num_neighbors=args.k,
        distance=args.distance,
        reweight=args.reweight,
        reweight_neighbors=args.reweight_neighbors,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration=_calibration_choice(args),
        threshold_quantile=args.threshold_quantile,
        feature_memory_budget=getattr(args, "feature_memory", None),
        precision=args.precision,
        **(
            {}
            if args.held_out_fraction is None
            else {"calibration_fraction": args.held_out_fraction}
        ),
    )
    return [
        PatchCoreConfig(backbone=backbone, layers=member_layers, **common)
        for backbone, member_layers in zip(backbones, layers, strict=True)
    ]


def _train_paths(args: argparse.Namespace) -> list[Path]:
    from patchcore_jax.datasets import folders

    paths = folders.load_train_paths(args.data)
    if args.train_images is not None:
        paths = folders.few_shot_subset(paths, args.train_images, args.train_seed)
    return paths


def _extend(args: argparse.Namespace) -> int:
    """``fit --resume MODEL``: DATA's training images join MODEL's bank (``PatchCore.extend``)."""
    from patchcore_jax import checkpoint, preprocess
    from patchcore_jax.model import PatchCore

    out = args.out or args.resume
    checkpoint.check_destination(out)  # a bad --out fails now, not after the work
    model = PatchCore.load(args.resume, mesh=_mesh(args.bank_shards))
    config = model.config
    paths = _train_paths(args)
    _say(f"adding {len(paths)} images of {args.data} to {args.resume} ({config.backbone})")
    with _progress(len(paths), "features", args.quiet) as bar:
        batches = preprocess.iter_image_batches(paths, config.batch_size, **_image_options(config))
        new_features = model.patch_features(batches, progress=bar.update)
    steps = max(1, int(len(new_features) * config.coreset_fraction))
    quiet = args.quiet or config.sampler != "approx_greedy_coreset"
    with _progress(steps, "coreset", quiet, unit="step") as bar:
        model.extend_features(new_features, log=_say, progress=bar.update)
    _say(f"saved model to {model.save(out)}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from patchcore_jax import calibration, checkpoint, ensemble, preprocess
    from patchcore_jax.model import PatchCore

    if args.resume is not None:
        return _extend(args)
    if args.out is None:
        raise ValueError("fit needs --out (the checkpoint folder to write)")
    checkpoint.check_destination(args.out)  # a bad --out fails now, not after the work
    configs = _configs(args)
    config = configs[0]
    paths = _train_paths(args)
    if config.calibration == "held-out":
        try:
            calibration.held_out_images(len(paths), config.calibration_fraction, config.seed)
        except ValueError as error:
            raise ValueError(f"--held-out-fraction: {error}") from None
    if len(configs) > 1 and args.validation is not None:
        raise ValueError("--validation calibrates one model, not an ensemble of several")
    validation = _validation_set(args.validation, config) if args.validation else None
    if len(configs) > 1:
        model = ensemble.Ensemble.from_configs(configs, mesh=_mesh(args.bank_shards))
    else:
        model = PatchCore(config, mesh=_mesh(args.bank_shards))
    for member in model.members:
        member.config.check_bank_size(member.bank_size(len(paths)))  # before any work
    names = ",".join(c.backbone for c in configs)
    _say(f"fitting {names} on {len(paths)} images of {args.data}")
    steps = sum(max(1, member.bank_size(len(paths))) for member in model.members)
    quiet = args.quiet or config.sampler != "approx_greedy_coreset"
    with (
        _progress(len(paths) * len(model.members), "features", args.quiet) as bar,
        _progress(steps, "coreset", quiet, unit="step") as coreset_bar,
    ):
        batches = preprocess.iter_image_batches(paths, config.batch_size, **_image_options(config))
        model.fit(
            batches,
            progress=bar.update,
            log=_say,
            coreset_progress=coreset_bar.update,
            spill_dir=args.spill_dir,
        )
    if validation is not None:
        val_paths, labels, masks = validation
        with _progress(len(val_paths), "validation", args.quiet) as bar:
            batches = preprocess.iter_image_batches(
                val_paths, config.batch_size, **_image_options(config)
            )
            model.calibrate(_counted(batches, bar), labels=labels, masks=masks)
        _say(f"calibration: {model.calibration.describe()}")
    _say(f"saved model to {model.save(args.out)}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from patchcore_jax import benchmark

    configs = _configs(args)
    results = benchmark.run_benchmark(
        args.root,
        args.out,
        configs,
        categories=args.categories,
        train_images=args.train_images,
        train_seed=args.train_seed,
        recompute=args.recompute,
        mesh=_mesh(args.bank_shards),
        log=_say,
        progress=lambda total, description: _progress(total, description, args.quiet),
    )
    failed = [r.name for r in results if r.error]
    _say(
        f"wrote {Path(args.out) / 'results.csv'}: {len(results) - len(failed)} of "
        f"{len(results)} categories ok"
        + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from patchcore_jax.checkpoint import load
    from patchcore_jax.files import output_folder

    model = load(args.model, mesh=_mesh(args.bank_shards))  # checked first
    calibration = model.calibration  # ensembles have none
    if args.masks and calibration is None:
        raise ValueError(
            f"--masks needs a calibrated model; {args.model} has no calibration (fitted with "
            "--calibration none or by an older version, or an ensemble)"
        )
    paths, names = _output_names(args.images, args.recursive)
    with output_folder(args.out, overwrite=args.overwrite) as out_dir:
        scores, maps, images = _score_paths(model, paths, args.quiet, not args.no_heatmaps)
        heatmaps = [""] * len(paths)
        if not args.no_heatmaps:
            masks = [_contour_mask(path, model.config) for path in paths]
            heatmaps = _save_heatmaps(
                out_dir / "heatmaps", names, paths, images, scores, maps, masks, args.quiet
            )
        mask_files = [""] * len(paths)
        if calibration is None:
            normalized, decisions = [""] * len(paths), [""] * len(paths)
        else:
            normalized = [_format_score(s) for s in calibration.normalize_image_scores(scores)]
            decisions = [int(d) for d in calibration.decisions(scores)]
            if args.masks:
                mask_files = _save_masks(out_dir / "masks", names, calibration.defect_masks(maps))
        _write_csv(
            out_dir / "scores.csv",
            ["image", "name", "score", "normalized_score", "anomalous", "heatmap", "mask"],
            [
                [str(path), name, _format_score(score), *rest]
                for path, name, score, *rest in zip(
                    paths, names, scores, normalized, decisions, heatmaps, mask_files, strict=True
                )
            ],
        )
    _say(
        f"scored {len(paths)} images (scores {_format_score(scores.min())} .. "
        f"{_format_score(scores.max())}); wrote {out_dir / 'scores.csv'}"
        + ("" if args.no_heatmaps else f" and {len(paths)} heatmaps")
        + (f" and {len(paths)} masks" if args.masks else "")
    )
    if calibration is None:
        _say(
            f"{args.model} has no calibration (fitted with --calibration none or by an older "
            "version): no decisions; refit to get thresholds"
        )
    else:
        _say(f"{sum(decisions)} of {len(paths)} images anomalous ({calibration.describe()})")
    return 0


def _save_masks(out_dir: Path, names: Sequence[str], masks: np.ndarray) -> list[str]:
    """Binary defect masks as PNGs (255 = defect) named like the heatmaps; returns their paths
    relative to ``out_dir.parent``."""
    from PIL import Image

    from patchcore_jax.files import atomic_path

    written = []
    for name, mask in zip(_heatmap_names(names), masks, strict=True):
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        written.append(target.relative_to(out_dir.parent).as_posix())
    return written


def _evaluate(args: argparse.Namespace) -> int:
    from patchcore_jax import metrics, preprocess
    from patchcore_jax.checkpoint import load
    from patchcore_jax.datasets import folders
    from patchcore_jax.files import atomic_write_text, output_folder

    model_path = Path(args.model).absolute()
    out_dir = Path(args.out) if args.out else model_path.with_name(f"{model_path.name}_evaluation")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; expected an output folder (--out)")
    model = load(args.model, mesh=_mesh(args.bank_shards))  # checked first
    dataset = folders.load_dataset(
        args.data, allow_missing_masks=args.allow_missing_masks, train=False
    )
    folders.validate_masks(dataset)
    samples = dataset.test_samples
    paths = [s.image_path for s in samples]
    config = model.config
    threshold = config.mask_threshold if args.mask_threshold is None else args.mask_threshold
    # Masks first: a broken mask is reported before any image is scored.
    masks = preprocess.load_masks(
        dataset.test_mask_paths, **_image_options(config), image_paths=paths, threshold=threshold
    )
    has_pixels = dataset.has_pixel_labels
    if not has_pixels.all():
        _say(
            f"{np.count_nonzero(~has_pixels)} defective images without masks are left out of "
            "the pixel metrics"
        )
    with output_folder(out_dir, overwrite=args.overwrite) as out_dir:
        scores, maps, images = _score_paths(model, paths, args.quiet, not args.no_heatmaps)
        labels = np.asarray(dataset.test_labels)
        defect_types = np.array([s.defect_type for s in samples])
        results = metrics.evaluate(labels, scores, masks, maps, pixel_images=has_pixels)
        per_type = {}
        for defect_type in dataset.defect_types:
            subset = (labels == 0) | (defect_types == defect_type)
            per_type[defect_type] = metrics.evaluate(
                labels[subset],
                scores[subset],
                masks[subset],
                maps[subset],
                pixel_images=has_pixels[subset],
            )
        f1_threshold = results["f1_threshold"]
        notes = metrics.missing_metric_reasons(results)
        calibration = model.calibration  # ensembles have none
        thresholds = {
            "calibrated": None if calibration is None else calibration.image_threshold,
            "f1_optimal": f1_threshold,
        }
        confusion = {
            name: None
            if threshold is None
            else {"threshold": threshold, **metrics.confusion_counts(labels, scores, threshold)}
            for name, threshold in thresholds.items()
        }
        if calibration is None:
            notes.append("the model has no calibration: no calibrated threshold to report")
        results = {
            "dataset": str(args.data),
            "model": str(args.model),
            **results,
            "confusion": confusion,
            "calibration": None if calibration is None else calibration.describe(),
            "num_without_masks": int(np.count_nonzero(~has_pixels)),
            "per_defect_type": per_type,
            "notes": notes,
            "config": config.to_dict(),
            **(
                {"members": [member.config.to_dict() for member in model.members]}
                if len(model.members) > 1
                else {}
            ),
        }
        atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
        heatmaps = [""] * len(paths)
        if not args.no_heatmaps:
            names = [f"{s.defect_type}/{s.image_path.name}" for s in samples]
            heatmaps = _save_heatmaps(
                out_dir / "heatmaps", names, paths, images, scores, maps, masks, args.quiet
            )
        _write_csv(
            out_dir / "per_image.csv",
            ["image", "defect_type", "label", "score", "predicted", "anomalous", "heatmap"],
            [
                [
                    str(s.image_path),
                    s.defect_type,
                    s.label,
                    _format_score(score),
                    "" if f1_threshold is None else int(score >= f1_threshold),
                    "" if calibration is None else int(score >= calibration.image_threshold),
                    heatmap,
                ]
                for s, score, heatmap in zip(samples, scores, heatmaps, strict=True)
            ],
        )
    for key, value in results.items():
        if isinstance(value, float | int) and not isinstance(value, bool):
            print(
                f"{key:>28s}: {value:.4f}" if isinstance(value, float) else f"{key:>28s}: {value}"
            )
    for name, counts in confusion.items():
        if counts is not None:
            print(
                f"{name + ' threshold':>28s}: {counts['threshold']:.6g}  "
                f"TP {counts['true_positives']}  FP {counts['false_positives']}  "
                f"TN {counts['true_negatives']}  FN {counts['false_negatives']}"
            )
    if per_type:
        print(f"{'image AUROC by defect type':>28s}:")
        for defect_type, values in per_type.items():
            auroc = values["image_auroc"]
            print(f"{defect_type:>28s}: " + ("n/a" if auroc is None else f"{auroc:.4f}"))
    for note in notes:
        _say(f"note: {note}")
    _say(f"wrote {out_dir / 'metrics.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from patchcore_jax.export import export_model
    from patchcore_jax.model import PatchCore

    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name")
    model = PatchCore.load(args.model)
    metadata = export_model(model, out, platforms=args.platforms)
    _say(f"exported {args.model} for {', '.join(metadata['platforms'])} to {out}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from patchcore_jax.datasets import split

    def named_dirs(values: Sequence[str], option: str) -> dict[str, Path]:
        named: dict[str, Path] = {}
        for value in values:
            name, _, folder = value.rpartition("=")
            folder_path = Path(folder)
            if not folder_path.is_dir():
                raise ValueError(f"{option} {value!r}: folder {folder!r} does not exist")
            name = name or split.default_defect_name(folder_path)
            if name in named:
                raise ValueError(f"{option}: defect type {name!r} given twice")
            named[name] = folder_path
        return named

    defects = named_dirs(args.defect, "--defect")
    mask_dirs = named_dirs(args.mask_dir, "--mask-dir")
    summary = split.split_dataset(
        args.good,
        defects,
        args.out,
        mask_dirs=mask_dirs,
        train_fraction=args.train_fraction,
        seed=args.seed,
        copy=args.copy,
    )
    _say(f"wrote {args.out}: {summary}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from patchcore_jax.datasets import download

    folders = download.fetch_mvtec_ad(
        args.out,
        args.categories,
        url=args.url or download.MVTEC_AD_URL,
        sha256=args.sha256 or download.MVTEC_AD_SHA256,
    )
    _say(f"MVTec AD categories ready in {args.out}: {', '.join(f.name for f in folders)}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from patchcore_jax import backbones

    if args.weights_command == "convert":
        path = backbones.convert_weights(args.file, args.arch, args.out_dir)
        print(f"converted {args.file} -> {path}")
    elif args.weights_command == "fetch":
        path = backbones.fetch_weights(args.name, args.out_dir)
        print(f"fetched and converted {args.name} -> {path}")
    else:
        for name in backbones.available_backbones():
            try:
                backbones.load_backbone(name)
                status = "available"
            except FileNotFoundError as error:
                status = f"missing: {error}"
            print(f"{name:18s} {status}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line each, in the tool's voice."""
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):  # presets become defaults; explicit options still win
        args = build_parser(_preset_defaults(args.preset)).parse_args(argv)
    handlers = {
        "fit": _fit,
        "predict": _predict,
        "evaluate": _evaluate,
        "export": _export,
        "benchmark": _benchmark,
        "split": _split,
        "data": _data,
        "weights": _weights,
    }
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if getattr(args, "compile_cache", "off") != "off":
                _enable_compile_cache(args.compile_cache)
            return handlers[args.command](args)
    except (ValueError, OSError) as error:  # CheckpointError and ImageLoadError included
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
