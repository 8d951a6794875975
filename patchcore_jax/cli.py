"""The ``patchcore-jax`` command: thin argument parsing over the library API.

patchcore-jax fit DATA --out MODEL [options]
patchcore-jax predict MODEL IMAGE_OR_FOLDER... --out DIR
patchcore-jax evaluate MODEL DATA [--out DIR]
patchcore-jax weights convert FILE --arch NAME | weights fetch NAME | weights list
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchcore_jax.config import CORESET_METHODS, DISTANCES, SAMPLERS, PatchCoreConfig

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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _layers(text: str) -> tuple[str, ...]:
    layers = tuple(name.strip() for name in text.split(",") if name.strip())
    if not layers:
        raise argparse.ArgumentTypeError("expected comma-separated stage names, e.g. layer2,layer3")
    return layers


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist")
    return path


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    defaults = PatchCoreConfig()
    group = parser.add_argument_group("model (defaults: the authors' reference settings)")
    group.add_argument(
        "--backbone",
        default=defaults.backbone,
        help="backbone: wide_resnet50_2 (paper; needs `weights fetch`), resnet18, "
        "resnet50, wide_resnet101_2, or mobilenet_v2 (bundled, offline) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="comma-separated backbone stages to aggregate "
        "(default: the backbone's stride-8 and stride-16 stages)",
    )
    group.add_argument(
        "--resize",
        type=_positive_int,
        default=defaults.resize,
        help="shorter image side after resizing, pixels (default: %(default)s)",
    )
    group.add_argument(
        "--crop",
        type=_positive_int,
        default=defaults.crop,
        help="centre-crop size, pixels (default: %(default)s)",
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
        type=_positive_int,
        default=defaults.reweight_neighbors,
        help="b, bank neighbourhood of the reweighting (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=int,
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


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bank-shards",
        type=_positive_int,
        default=1,
        help="devices that split the memory bank during scoring (default: 1, "
        "i.e. purely data-parallel)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="PatchCore anomaly detection in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = commands.add_parser(
        "fit",
        help="fit a model on the nominal training images of DATA",
        description="Fit a PatchCore memory bank on DATA's nominal "
        "images (DATA/train/good, or DATA/train) and save it.",
    )
    fit.add_argument("data", type=_existing_dir, help="dataset folder (MVTec AD layout)")
    fit.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_model_options(fit)
    _add_run_options(fit)

    predict = commands.add_parser(
        "predict",
        help="score images with a fitted model",
        description="Score images; writes scores.csv and, per image, a heatmap PNG into --out.",
    )
    predict.add_argument("model", help="checkpoint folder written by `fit`")
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--out", required=True, help="output folder (created if missing)")
    predict.add_argument("--no-heatmaps", action="store_true", help="write scores.csv only")
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
        help="output folder (default: MODEL_evaluation beside the model, which stays untouched)",
    )
    evaluate.add_argument("--no-heatmaps", action="store_true", help="skip heatmap PNGs")
    _add_run_options(evaluate)

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


def _score_paths(model, paths: Sequence[Path], quiet: bool, keep_images: bool):
    """Scores image files batch by batch.

    Returns (image_scores [N], anomaly_maps [N, H, W], the uint8 crops [N, H, W, 3] if
    ``keep_images`` (for the heatmaps, so no image is decoded twice) else None).
    """
    from patchcore_jax import preprocess

    config = model.config
    scores, maps, images = [], [], []

    def remembered(batches):
        for batch in batches:
            if keep_images:
                images.append(batch)
            yield batch

    with _progress(len(paths), "scoring", quiet) as bar:
        batches = preprocess.iter_image_batches(
            paths, config.batch_size, config.resize, config.crop
        )
        for result in model.score(remembered(batches)):
            scores.append(result.image_scores)
            maps.append(result.anomaly_maps)
            bar.update(len(result.image_scores))
    return (
        np.concatenate(scores),
        np.concatenate(maps),
        (np.concatenate(images) if keep_images else None),
    )


def _save_heatmaps(out_dir: Path, paths, images, scores, maps, masks, quiet: bool) -> None:
    """One PNG per image, colour scale shared over the set (min-max of all maps)."""
    from patchcore_jax import viz

    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    used: set[str] = set()
    with _progress(len(paths), "heatmaps", quiet) as bar:
        for index, path in enumerate(paths):
            name = "_".join(Path(path).parts[-2:]).rsplit(".", 1)[0]
            while name in used:
                name += "_"
            used.add(name)
            viz.save_anomaly_figure(
                out_dir / f"{name}.png",
                images[index],
                maps[index],
                mask=masks[index],
                score=float(scores[index]),
                title=str(path),
                vmin=vmin,
                vmax=vmax,
            )
            bar.update(1)


# ---------------------------------------------------------------------------- commands


def _fit(args: argparse.Namespace) -> int:
    from patchcore_jax import data, preprocess
    from patchcore_jax.model import PatchCore

    config = PatchCoreConfig(
        backbone=args.backbone,
        layers=args.layers,
        resize=args.resize,
        crop=args.crop,
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
    )
    dataset = data.load_dataset(args.data)
    model = PatchCore(config, mesh=_mesh(args.bank_shards))
    paths = dataset.train_paths
    _say(f"fitting {config.backbone} on {len(paths)} images of {args.data}")
    with _progress(len(paths), "features", args.quiet) as bar:
        batches = preprocess.iter_image_batches(
            paths, config.batch_size, config.resize, config.crop
        )
        bank_features = model.patch_features(batches, progress=bar.update)
    steps = max(1, int(len(bank_features) * config.coreset_fraction))
    quiet = args.quiet or config.sampler != "approx_greedy_coreset"
    with _progress(steps, "coreset", quiet, unit="step") as bar:
        model.fit_features(bank_features, log=_say, progress=bar.update)
    _say(f"saved model to {model.save(args.out)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from patchcore_jax import data, preprocess
    from patchcore_jax.model import PatchCore

    model = PatchCore.load(args.model, mesh=_mesh(args.bank_shards))  # checked first
    paths = data.image_paths(args.images)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, maps, images = _score_paths(model, paths, args.quiet, not args.no_heatmaps)
    _write_csv(
        out_dir / "scores.csv",
        ["image", "score"],
        [[str(p), f"{s:.6g}"] for p, s in zip(paths, scores, strict=True)],
    )
    if not args.no_heatmaps:
        config = model.config
        masks = []
        for path in paths:  # ground truth where the MVTec layout has it, for the contour
            mask_path = data.find_mask(path)
            masks.append(
                None
                if mask_path is None
                else preprocess.load_mask(mask_path, config.resize, config.crop, image_path=path)
            )
        _save_heatmaps(out_dir / "heatmaps", paths, images, scores, maps, masks, args.quiet)
    _say(f"wrote {out_dir / 'scores.csv'} ({len(paths)} images)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from patchcore_jax import data, metrics, preprocess
    from patchcore_jax.files import atomic_write_text
    from patchcore_jax.model import PatchCore

    model = PatchCore.load(args.model, mesh=_mesh(args.bank_shards))  # checked first
    dataset = data.load_dataset(args.data)
    data.validate_masks(dataset)
    model_path = Path(args.model).absolute()
    out_dir = Path(args.out) if args.out else model_path.with_name(f"{model_path.name}_evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = dataset.test_samples
    paths = [s.image_path for s in samples]
    scores, maps, images = _score_paths(model, paths, args.quiet, not args.no_heatmaps)
    config = model.config
    masks = preprocess.load_masks(
        dataset.test_mask_paths, config.resize, config.crop, image_paths=paths
    )
    labels = np.asarray(dataset.test_labels)
    results = metrics.evaluate(labels, scores, masks, maps)
    threshold = results["f1_threshold"]
    results = {
        "dataset": str(args.data),
        "model": str(args.model),
        "num_images": len(samples),
        **results,
        "config": config.to_dict(),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    _write_csv(
        out_dir / "per_image.csv",
        ["image", "defect_type", "label", "score", "predicted"],
        [
            [
                str(s.image_path),
                s.defect_type,
                s.label,
                f"{score:.6g}",
                "" if threshold is None else int(score >= threshold),
            ]
            for s, score in zip(samples, scores, strict=True)
        ],
    )
    if not args.no_heatmaps:
        _save_heatmaps(out_dir / "heatmaps", paths, images, scores, maps, masks, args.quiet)
    for key, value in results.items():
        if isinstance(value, float | int) and not isinstance(value, bool):
            print(
                f"{key:>28s}: {value:.4f}" if isinstance(value, float) else f"{key:>28s}: {value}"
            )
    _say(f"wrote {out_dir / 'metrics.json'}")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    handlers = {"fit": _fit, "predict": _predict, "evaluate": _evaluate, "weights": _weights}
    try:
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
