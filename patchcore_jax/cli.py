"""The ``patchcore-jax`` command: parses arguments, calls a workflow, prints.

patchcore-jax fit DATA --out MODEL [options]
patchcore-jax predict MODEL IMAGE_OR_FOLDER... --out DIR [--masks]
patchcore-jax evaluate MODEL DATA [--out DIR]
patchcore-jax export MODEL --out PROGRAM [--bank-out BANK] [--platforms cpu,cuda,tpu] [--overwrite]
patchcore-jax benchmark ROOT --out DIR [model options] [--categories a,b] [--train-images N]
patchcore-jax split --good DIR --defect [NAME=]DIR ... --out ROOT
patchcore-jax data fetch mvtec-ad [--categories a,b] [--out DIR]
patchcore-jax weights convert FILE --arch NAME | weights fetch NAME | weights list
(work: ``patchcore_jax.workflows``; model options: ``patchcore_jax.options``)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from patchcore_jax import errors, interrupt, options, progress
from patchcore_jax.config import SEED_LIMIT
from patchcore_jax.files import quantity
from patchcore_jax.progress import ProgressBars, close_bars

PROG = "patchcore-jax"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _checked(kind: type, accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` if ``accept`` takes it, else "expected ..."."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_fraction = _checked(float, lambda value: 0.0 < value <= 1.0, "a number in (0, 1]")
_seed = _checked(int, lambda value: 0 <= value < SEED_LIMIT, "an integer in [0, 2**32)")


def _platforms(text: str) -> tuple[str, ...]:
    platforms = tuple(name.strip() for name in text.split(",") if name.strip())
    known = ("cpu", "cuda", "tpu")
    if not platforms or any(name not in known for name in platforms):
        raise argparse.ArgumentTypeError(f"expected names among {','.join(known)}, got {text!r}")
    return platforms


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


# ---------------------------------------------------------------- the parser


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


def _add_categories(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument(
        "--categories",
        type=options.names,
        default=None,
        metavar="a,b",
        help=f"comma-separated categories {which}",
    )


def _add_fit_parser(commands: Any, presets: dict[str, object] | None) -> None:
    fit = commands.add_parser(
        "fit",
        usage=f"{PROG} fit DATA --out DIR [options]\n"
        f"       {PROG} fit DATA --resume MODEL [--out DIR] [options]",
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
        "--out", metavar="DIR", help="checkpoint folder to write (required without --resume)"
    )
    fit.add_argument(
        "--resume",
        default=None,
        metavar="MODEL",
        help="add DATA's training images to this fitted model instead of fitting anew: the "
        "coreset selection continues from its bank (model options come from MODEL); --out "
        "defaults to MODEL, replaced atomically",
    )
    calibration = options.add_model_options(fit, presets)
    fit.add_argument(
        "--spill-dir",
        default=None,
        metavar="DIR",
        help="folder of the temporary spill file (default: the system's temporary folder)",
    )
    _add_few_shot_options(fit)
    calibration.add_argument(
        "--validation",
        type=_existing_dir,
        default=None,
        metavar="DIR",
        help="calibrate on this folder instead: MVTec layout (DIR/test, DIR/ground_truth; "
        "F1-optimal thresholds) or a folder of good images (quantile thresholds)",
    )
    options.add_run_options(fit)


_SKIP_HELP = (
    "score the other images when some cannot be used (unreadable, or too small), list those in "
    "--out/unreadable.csv and exit with status 1 (default: stop before scoring, naming them)"
)


def _add_predict_and_evaluate_parsers(commands: Any) -> None:
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
        help="write defect masks to masks/ (PNG, 255 = defect, at the calibrated pixel threshold)",
    )
    predict.add_argument(
        "--recursive", action="store_true", help="also take images in sub-folders of folders"
    )
    overwrite = "replace the previous results in --out (only a folder patchcore-jax wrote)"
    predict.add_argument("--overwrite", action="store_true", help=overwrite)
    predict.add_argument("--skip-unreadable", action="store_true", help=_SKIP_HELP)
    options.add_run_options(predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="MVTec AD metrics of a model on DATA/test",
        description="Score DATA/test; print and write metrics.json, per_image.csv, heatmaps "
        "and the operating-point pictures (score_distributions.png, roc.png).",
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
        type=int,
        default=None,
        help="binarise masks that are not 0/255 at this value (default: the model's, 128)",
    )
    evaluate.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="accept defect images without a mask; they are left out of the pixel metrics",
    )
    evaluate.add_argument("--overwrite", action="store_true", help=overwrite)
    evaluate.add_argument("--skip-unreadable", action="store_true", help=_SKIP_HELP)
    options.add_run_options(evaluate)


def _add_export_and_benchmark_parsers(commands: Any, presets: dict[str, object] | None) -> None:
    export = commands.add_parser(
        "export",
        help="serialise a model's inference for deployment (jax.export, StableHLO)",
        description="Write MODEL's whole inference (uint8 crops -> image scores, normalised "
        "scores, decisions, anomaly maps; any batch size at once) to PROGRAM, with the memory "
        "bank inside or, with --bank-out, in BANK; run it with patchcore_jax.exported.load("
        "PROGRAM[, bank=BANK]), which needs only jax and numpy. --bank-out alone: only BANK.",
    )
    export.add_argument("model", help="checkpoint folder written by `fit` (calibrated)")
    export.add_argument("--out", metavar="PROGRAM", help="program file to write")
    export.add_argument("--bank-out", metavar="BANK", help="bank file: the program's input")
    export.add_argument("--overwrite", action="store_true", help="replace non-export output files")
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
    _add_categories(benchmark, "to run (default: every category folder of ROOT)")
    benchmark.add_argument(
        "--recompute", action="store_true", help="recompute categories finished before"
    )
    options.add_model_options(benchmark, presets)
    _add_few_shot_options(benchmark)
    options.add_run_options(benchmark)


def _add_split_parser(commands: Any) -> None:
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
        "--seed", type=_seed, default=0, help="seed of the train/test draw (default: 0)"
    )
    split.add_argument("--copy", action="store_true", help="copy files instead of linking to them")


def _add_download_parsers(commands: Any) -> None:
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
    _add_categories(fetch_data, "(default: all 15)")
    fetch_data.add_argument(
        "--out", default="mvtec_ad", help="folder for <category>/ folders (default: %(default)s)"
    )
    fetch_data.add_argument(
        "--url", default=None, help="a mirror or local file:// copy of the official archive"
    )
    fetch_data.add_argument(
        "--sha256", default=None, help="expected sha256 of --url (default: the official one)"
    )

    from patchcore_jax.backbones import fetchable_backbones

    weights = commands.add_parser("weights", help="convert or download backbone weights")
    weight_commands = weights.add_subparsers(
        dest="weights_command", required=True, parser_class=_Parser
    )
    convert = weight_commands.add_parser(
        "convert", help="convert a torchvision/timm (.pth, .safetensors) or TFLite file"
    )
    convert.add_argument("file", help="weights file to convert")
    convert.add_argument("--arch", required=True, help="architecture, e.g. wide_resnet50_2")
    convert.add_argument("--out-dir", default=None, help="weights folder (default: `weights list`)")
    fetch = weight_commands.add_parser(
        "fetch", help="download torchvision's ImageNet weights, verify and convert them"
    )
    fetch.add_argument("name", help=f"architecture: {', '.join(fetchable_backbones())}")
    fetch.add_argument("--out-dir", default=None, help="weights folder (default: `weights list`)")
    weight_commands.add_parser("list", help="list the backbones and where their weights are")


def build_parser(presets: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The command's parser; ``presets`` (``options.preset_defaults``) become option defaults."""
    from patchcore_jax.version import package_version

    parser = _Parser(prog=PROG, description="PatchCore anomaly detection in JAX.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_fit_parser(commands, presets)
    _add_predict_and_evaluate_parsers(commands)
    _add_export_and_benchmark_parsers(commands, presets)
    _add_split_parser(commands)
    _add_download_parsers(commands)
    return parser


# ---------------------------------------------------------------- commands


def _say(message: str) -> None:
    from patchcore_jax import sharding  # jax: imported when a command runs, not with the parser

    if sharding.is_primary_process():  # one set of messages in a multi-process job
        progress.say(message)  # above the progress bar, if one is drawn


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The run options every workflow takes: mesh, progress bars, image reader, log."""
    from patchcore_jax import sharding

    run = {"mesh": sharding.make_mesh(args.bank_shards), "progress": ProgressBars(args.quiet)}
    return {**run, "reader": options.image_reader(args), "log": _say}


def _fit(args: argparse.Namespace) -> int:
    from patchcore_jax import workflows

    few_shot = {"train_images": args.train_images, "train_seed": args.train_seed}
    report = {**_run(args), "spill_dir": args.spill_dir}
    if args.resume is not None:
        given = {"config_values": options.resume_values(args)}
        workflows.extend_folder(args.data, args.resume, args.out, **given, **few_shot, **report)
        return 0
    models = options.model_arguments(args)
    if args.out is None:
        raise ValueError("fit needs --out (the checkpoint folder to write)")
    workflows.fit_folder(
        args.data, args.out, validation=args.validation, **models, **few_shot, **report
    )
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from patchcore_jax import benchmark

    results = benchmark.run_benchmark(
        args.root,
        args.out,
        **options.model_arguments(args),
        categories=args.categories,
        train_images=args.train_images,
        train_seed=args.train_seed,
        recompute=args.recompute,
        **_run(args),
    )
    failed = [r.name for r in results if r.error]
    _say(
        f"wrote {Path(args.out) / 'results.csv'}: {len(results) - len(failed)} of "
        f"{quantity(len(results), 'category', 'categories')} ok"
        + (f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from patchcore_jax.reports import format_score
    from patchcore_jax.workflows import predict_files

    result = predict_files(
        args.model,
        args.images,
        args.out,
        recursive=args.recursive,
        heatmaps=not args.no_heatmaps,
        masks=args.masks,
        overwrite=args.overwrite,
        skip_unreadable=args.skip_unreadable,
        **_run(args),
    )
    scores, count = result.image_scores, len(result.paths)
    _say(
        f"scored {quantity(count, 'image')} (scores {format_score(scores.min())} .. "
        f"{format_score(scores.max())}); wrote {result.scores_csv}"
        + (f" and {quantity(result.num_heatmaps, 'heatmap')}" if result.num_heatmaps else "")
        + (f" and {quantity(result.num_masks, 'mask')}" if result.num_masks else "")
    )
    if result.calibration is None:
        _say(
            f"{args.model} has no calibration (fitted with --calibration none or by an older "
            "version): no decisions; refit to get thresholds"
        )
    else:
        anomalous = int(result.decisions.sum())
        rule = result.calibration.describe()
        _say(f"{anomalous} of {quantity(count, 'image')} anomalous ({rule})")
        _say(result.calibration.describe_false_alarms())
    return _skipped(result.unreadable, args.out)


def _skipped(unreadable: list, out: Path) -> int:
    """Exit status 1 with a summary line when images were skipped as unreadable, else 0."""
    from patchcore_jax.preprocess import describe_unusable

    if unreadable:
        listed = f"{describe_unusable(unreadable)}; listed in {Path(out) / 'unreadable.csv'}"
        _say(f"skipped {quantity(len(unreadable), 'unreadable image')}: {listed}")
    return 1 if unreadable else 0


def _evaluate(args: argparse.Namespace) -> int:
    from patchcore_jax import metrics, workflows

    out = args.out or workflows.default_evaluation_folder(args.model)
    report = workflows.evaluate_dataset(
        args.model,
        args.data,
        out,
        mask_threshold=args.mask_threshold,
        allow_missing_masks=args.allow_missing_masks,
        heatmaps=not args.no_heatmaps,
        overwrite=args.overwrite,
        skip_unreadable=args.skip_unreadable,
        **_run(args),
    )
    print("\n".join(metrics.report_lines(report)))
    for note in report["notes"]:
        _say(f"note: {note}")
    _say(f"wrote {Path(out) / 'metrics.json'}")
    return _skipped([(r["image"], r["reason"]) for r in report["unreadable"]], out)


def _export(args: argparse.Namespace) -> int:
    from patchcore_jax.export import export_checkpoint

    choices = {"bank_out": args.bank_out, "platforms": args.platforms, "overwrite": args.overwrite}
    with progress.phase(ProgressBars(quiet=False), "export"):
        written = export_checkpoint(args.model, args.out, **choices)
    _say(f"exported {args.model} to {'; '.join(written)}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from patchcore_jax.datasets import split

    summary = split.split_dataset(
        args.good,
        split.named_folders(args.defect, "--defect"),
        args.out,
        mask_dirs=split.named_folders(args.mask_dir, "--mask-dir"),
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
        print("\n".join(backbones.describe_weights()))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line each, in the tool's voice (above the progress bar)."""
    progress.say(f"{PROG}: warning: {message}")


LONG_COMMANDS = ("fit", "predict", "evaluate", "benchmark")  # Ctrl-C: stop at a safe point
HANDLERS = {
    "fit": _fit,
    "predict": _predict,
    "evaluate": _evaluate,
    "export": _export,
    "benchmark": _benchmark,
    "split": _split,
    "data": _data,
    "weights": _weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "preset", None):  # presets become defaults; explicit options still win
            args = build_parser(options.preset_defaults(args.preset)).parse_args(argv)
        with warnings.catch_warnings():
            from patchcore_jax import sharding  # not at import: the image workers import none

            warnings.showwarning = _show_warning
            if getattr(args, "compile_cache", "off") != "off":
                sharding.enable_compile_cache(args.compile_cache)
            distributed = options.distributed_arguments(args)
            if distributed is not None:  # before anything starts a JAX backend
                sharding.initialize_distributed(**distributed)
                if not sharding.is_primary_process():  # process 0 alone prints results
                    args.quiet, sys.stdout = True, open(os.devnull, "w")  # noqa: SIM115
            long = args.command in LONG_COMMANDS
            with interrupt.handling_sigint() if long else contextlib.nullcontext():
                status = HANDLERS[args.command](args)
                interrupt.check()  # Ctrl-C after the last check: the results are written
                return status
    except errors.USER_ERRORS as error:  # on purpose; other errors (bugs) keep their traceback
        close_bars()
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        sys.stderr.write(f"{PROG}: error: {options.in_option_words(message, args)}\n")
        return 2
    except KeyboardInterrupt:  # interrupt.Interrupted: stopped at a safe point, nothing saved
        close_bars()
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    finally:
        close_bars()  # the last stage's line, and the progress timers


if __name__ == "__main__":
    raise SystemExit(main())
