"""One prepared run for a lent accelerator: correctness against the reference fixtures, then speed.

Runs on jax's default backend (one device) and takes a few minutes on an H200:

  correctness  patch features, greedy coreset indices, k-NN scores/maps/indices (and the tiny
               torchvision ResNet if safetensors is installed) against ``reference_parity.npz``
               and the ResNet fixture, with the tolerances of the CPU test suite; the ``fast``
               k-NN's neighbours and re-ranked distances against the same fixture;
  backbone     wide_resnet50_2 (random weights, layer2 + layer3) + patch features, batch 32;
  coreset      greedy coreset seconds per 1,000 steps on 1M x 128 rows vs the copy-bandwidth floor;
  knn          k-NN ms per image (784 x 1024 queries, 16,384 x 1024 bank) and TFLOP/s vs the
               measured matmul rate, for each precision (float32 HIGHEST; bfloat16), and the
               certified exact k-NN against the plain scan (certified fraction, TFLOP/s);
  bottle       bottle-sized work (209 training images -> N = 163,856 patches, 83 test images,
               from the shipped demo category) with MobileNetV2 and WideResNet-50-2 (random
               weights), each in both precisions: fit phases after compilation, compile seconds,
               fast-vs-exact Spearman, and steady-state predict images/s at batch 64/128/256
               over 5,000 images.

Every timing is taken after compilation, with ``jax.block_until_ready``, best of N calls. The
markdown table is rewritten after each part, so a run cut short keeps what it measured. Exit
status 1 if any check fails or a part raises. Uses no pytest; packages that only some checks
need (safetensors) are imported lazily and their checks are marked skipped when missing.

    python benchmarks/gpu_check.py [--out PATH] [--parts correctness knn ...] [--small]

``--small`` shrinks every size so the whole run takes about a minute on a 2-core CPU (a smoke
test of the script, not a measurement). The fixtures are read from the repository's
``tests/fixtures`` (nothing from ``../shared``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import coreset as coreset_benchmark  # benchmarks/coreset.py: greedy step timing, bytes per step
import jax
import jax.numpy as jnp
import numpy as np
from common import REPO_ROOT, RESULTS, best_times, command_line

sys.path.insert(0, str(REPO_ROOT / "tests"))
from fixture_data import FIXTURES, load_fixture  # noqa: E402  (the tests' one loader)
from float_rounding import (  # noqa: E402  (derived rounding bounds)
    compare_greedy_selection,
    nearest_index_differences,
)

from patchcore_jax import coreset, features, knn, scoring, sharding
from patchcore_jax.backbones import init_backbone
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.features import embed_images
from patchcore_jax.model import PatchCore

HIGHEST = jax.lax.Precision.HIGHEST
BACKBONE = "wide_resnet50_2"
LAYERS = ("layer2", "layer3")
EMBED_DIMENSION = 1024  # pretrain and target embedding dimension (PatchCore defaults)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes; the defaults are the GPU run, ``SMALL`` the CPU smoke test."""

    image_size: int = 224
    batch: int = 32
    repeats: int = 10
    coreset_rows: int = 1_000_000
    coreset_steps: tuple[int, int] = (100, 1100)
    copy_bytes: int = 2**30
    knn_bank: int = 16_384
    knn_dim: int = 1024
    knn_patches: int = 784
    knn_images: int = 8
    coreset_fraction: float = 0.1
    bottle_train_sources: int = 70
    bottle_train: int = 209
    bottle_test: int = 83
    predict_total: int = 5000
    predict_batches: tuple[int, ...] = (64, 128, 256)


SMALL = Sizes(
    image_size=64,
    batch=2,
    repeats=2,
    coreset_rows=20_000,
    coreset_steps=(10, 60),
    copy_bytes=64 * 2**20,
    knn_bank=2048,
    knn_patches=64,
    knn_images=2,
    bottle_train_sources=3,
    bottle_train=8,
    bottle_test=4,
    predict_total=12,
    predict_batches=(4,),
)


# ---------------------------------------------------------------------------------- reporting


class Report:
    """Check and timing rows, written as one markdown file after every part."""

    def __init__(self, path: Path, sizes: Sizes, small: bool) -> None:
        self.path, self.sizes, self.small = path, sizes, small
        self.checks: list[tuple[str, str, str, str]] = []
        self.timings: list[tuple[str, str, str, str]] = []
        self.errors: list[str] = []

    def check(self, name: str, passed: bool, measured: str, tolerance: str) -> None:
        status = "PASS" if passed else "FAIL"
        self.checks.append((name, status, measured, tolerance))
        print(f"[{status}] {name}: {measured} (tolerance {tolerance})", flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.checks.append((name, f"skipped ({reason})", "", ""))
        print(f"[SKIP] {name}: {reason}", flush=True)

    def timing(self, what: str, measured: str, floor: str = "", notes: str = "") -> None:
        self.timings.append((what, measured, floor, notes))
        print(f"[TIME] {what}: {measured}  {floor}  {notes}", flush=True)

    def error(self, part: str, error: BaseException) -> None:
        message = f"{part}: {type(error).__name__}: {error}".replace("\n", " ")[:300]
        self.errors.append(message)
        print(f"[ERROR] {message}", flush=True)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(row[1] == "FAIL" for row in self.checks)

    def summary(self) -> str:
        """One line: how many checks passed, failed or were skipped, and parts that raised."""
        statuses = [row[1] for row in self.checks]
        passed, failed = statuses.count("PASS"), statuses.count("FAIL")
        skipped = len(statuses) - passed - failed
        line = f"Result: {passed} checks passed, {failed} failed, {skipped} skipped"
        if self.errors:
            line += f"; {len(self.errors)} part(s) raised errors (listed at the end)"
        return line + "."

    def markdown(self) -> str:
        device = jax.devices()[0]
        platform_version = " ".join(str(getattr(device.client, "platform_version", "")).split())
        sizes = self.sizes
        lines = [
            "# Accelerator check"
            + (" (--small smoke test, not a measurement)" if self.small else ""),
            "",
            f"Command: `{command_line()}`  ",
            f"Device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
            f"device(s){', ' + platform_version if platform_version else ''})  ",
            f"jax {jax.__version__}, Python {sys.version.split()[0]}  ",
            f"Date: {datetime.date.today().isoformat()}",
            "",
            self.summary(),
            "",
            "## Correctness against the reference fixtures",
            "",
            "| check | result | measured | tolerance |",
            "|---|---|---|---|",
            *(f"| {' | '.join(row)} |" for row in self.checks),
            "",
            "## Speed (after compilation, best of N, `jax.block_until_ready`)",
            "",
            f"Images {sizes.image_size}x{sizes.image_size} px uint8, {BACKBONE} with random "
            f"weights (same cost as the real ones), stages {' + '.join(LAYERS)}, patch features "
            f"{EMBED_DIMENSION}-d; best of {sizes.repeats} timed calls unless noted.",
            "",
            "| what | measured | floor (what the hardware allows) | notes |",
            "|---|---:|---:|---|",
            *(f"| {' | '.join(row)} |" for row in self.timings),
        ]
        if self.errors:
            lines += ["", "## Errors", "", *(f"- {message}" for message in self.errors)]
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        text = self.markdown()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text, encoding="utf-8")
        return text


# ---------------------------------------------------------------------------------- helpers


def relative_error(ours, expected: np.ndarray) -> float:
    """max |ours - expected| / max |expected|."""
    return float(np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max())


def random_images(count: int, size: int, seed: int) -> np.ndarray:
    """[count, size, size, 3] uint8 noise images."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def seconds(start: float) -> float:
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- correctness


def check_correctness(report: Report, sizes: Sizes) -> None:
    """Device results against the reference fixtures, with the CPU test suite's tolerances."""
    for group in ("embed_square", "embed_rect", "embed_d384"):
        data = load_fixture("reference_parity", group)
        maps = [
            np.ascontiguousarray(data[f"{layer}_nchw"].transpose(0, 2, 3, 1)) for layer in LAYERS
        ]
        dims = int(data["pretrain_embed_dimension"]), int(data["target_embed_dimension"])
        expected = data["features"]
        for path, function in (
            ("patch_features", lambda m=maps, d=dims: features.patch_features(m, *d)),
            (
                "general path",
                lambda m=maps, d=dims: features._patch_features_general(tuple(m), *d, 3),
            ),
        ):
            ours = np.asarray(function())
            error = (
                float(np.abs(ours[0] - expected).max())
                if ours.shape[1:] == expected.shape
                else float("inf")
            )
            report.check(
                f"{path} `{group}`", error <= 1e-5, f"max abs error {error:.2e}", "1e-5 abs"
            )

    for group in ("coreset_d1024", "coreset_d128"):
        case = load_fixture("reference_parity", group)
        expected = case["indices"]
        selected = np.asarray(
            coreset.approximate_greedy_coreset(
                case["features"],
                len(expected),
                projection=case.get("projection"),
                start_indices=case["start_points"],
            )
        )
        # Identical up to float32 near-ties: a GPU rounds differently from the CPU that made
        # the fixture, so two rows at a near-tie may be taken in the other order (counted).
        comparison = compare_greedy_selection(
            case["features"], selected, expected, case["start_points"], case.get("projection")
        )
        measured = comparison.summary()
        report.check(
            f"greedy coreset `{group}`", comparison.ok, measured, "identical up to near-ties"
        )

    data = load_fixture("reference_parity", "score")
    num_images = len(data["image_scores"])
    result = scoring.score_patch_features(
        data["queries"].reshape(num_images, -1, data["queries"].shape[-1]),
        data["memory_bank"],
        (28, 28),
        (224, 224),
    )
    for name, ours, expected in (
        ("patch scores", result.patch_scores, data["patch_scores"]),
        ("image scores", result.image_scores, data["image_scores"]),
        ("anomaly maps", result.anomaly_maps, data["maps"]),
    ):
        error = relative_error(np.asarray(ours).ravel(), expected.ravel())
        report.check(
            f"score_patch_features {name}",
            error < 1e-4,
            f"max relative error {error:.2e}",
            "1e-4 relative",
        )
    # Identical nearest rows up to float32 near-ties (counted), as for the coreset.
    ties, differ = nearest_index_differences(
        data["queries"],
        data["memory_bank"],
        np.asarray(result.nearest_indices).ravel(),
        data["nearest_index"],
    )
    report.check(
        "score_patch_features nearest indices",
        differ == 0,
        f"{differ} of {len(data['nearest_index'])} differ beyond a near-tie, {ties} near-ties",
        "identical up to near-ties",
    )
    distances, indices = knn.nearest_neighbors(data["queries"], data["memory_bank"])
    error = relative_error(np.asarray(distances)[:, 0], data["patch_scores"])
    ties, differ = nearest_index_differences(
        data["queries"], data["memory_bank"], np.asarray(indices)[:, 0], data["nearest_index"]
    )
    report.check(
        "nearest_neighbors distances and indices",
        error < 1e-4 and differ == 0,
        f"max relative error {error:.2e}, {differ} indices differ beyond a near-tie, "
        f"{ties} near-ties",
        "1e-4 relative, identical up to near-ties",
    )

    # The fast precision: bfloat16 candidates re-ranked with exact float32 distances.
    distances, indices = knn.nearest_neighbors(
        data["queries"], data["memory_bank"], precision="fast"
    )
    found = np.asarray(indices)[:, 0] == data["nearest_index"]
    error = relative_error(np.asarray(distances)[found, 0], data["patch_scores"][found])
    report.check(
        "nearest_neighbors, precision fast: neighbours found, their distances",
        found.mean() >= 0.99 and error < 1e-4,
        f"{found.mean():.4f} found, max relative error {error:.2e}",
        ">= 0.99 found, 1e-4 relative",
    )

    check_tiny_resnet(report)


def check_tiny_resnet(report: Report) -> None:
    """The torchvision ``ResNet(Bottleneck, [1, 2, 1, 1], width_per_group=16)`` fixture."""
    name = "tiny torchvision ResNet (all stages + logits)"
    try:
        from safetensors.numpy import load_file
    except ImportError:
        report.skip(name, "package safetensors missing")
        return
    from patchcore_jax.backbones.convert import resnet_variables_from_state_dict
    from patchcore_jax.backbones.resnet import RESNET_STAGES, Bottleneck, ResNet

    module = ResNet(
        Bottleneck, (1, 2, 1, 1), width_per_group=16, num_classes=10, layers=RESNET_STAGES
    )
    state_dict = load_file(str(FIXTURES / "torchvision_tiny_resnet.safetensors"))
    variables = resnet_variables_from_state_dict(state_dict, module)
    io = load_fixture("torchvision_tiny_resnet_io")
    images = jnp.asarray(io["input_nchw"].transpose(0, 2, 3, 1))
    outputs = module.apply(variables, images, method=ResNet.forward_normalized)
    errors = {
        stage: relative_error(outputs[stage], io[f"{stage}_nchw"].transpose(0, 2, 3, 1))
        for stage in RESNET_STAGES[:-1]
    }
    errors["logits"] = relative_error(outputs["logits"], io["logits"])
    worst = max(errors, key=errors.get)
    report.check(
        name,
        max(errors.values()) < 1e-4,
        f"max relative error {errors[worst]:.2e} ({worst})",
        "1e-4 relative",
    )


# ---------------------------------------------------------------------------------- speed


def time_backbone(report: Report, sizes: Sizes) -> None:
    """Backbone + patch features (``features.embed_images``), and the patch features alone."""
    backbone = init_backbone(BACKBONE, LAYERS)
    embed = jax.jit(
        functools.partial(
            embed_images,
            backbone.module,
            pretrain_embed_dimension=EMBED_DIMENSION,
            target_embed_dimension=EMBED_DIMENSION,
            patch_size=3,
        )
    )
    images = jax.device_put(random_images(sizes.batch, sizes.image_size, seed=0))
    variables = jax.device_put(backbone.variables)
    start = time.perf_counter()
    compiled = embed.lower(variables, images).compile()
    compile_seconds = seconds(start)
    # Random maps of the stages' shapes: timing the features alone needs no second compile of
    # the backbone.
    stage_shapes = jax.eval_shape(backbone.module.apply, variables, images)
    rng = np.random.default_rng(4)
    maps = [
        jnp.asarray(rng.normal(size=shape.shape).astype(np.float32))
        for shape in stage_shapes.values()
    ]
    patch_features_only = jax.jit(
        functools.partial(
            features.patch_features,
            pretrain_embed_dimension=EMBED_DIMENSION,
            target_embed_dimension=EMBED_DIMENSION,
        )
    )
    best = best_times(
        {
            "embed": lambda: compiled(variables, images),
            "features": lambda: patch_features_only(maps),
        },
        sizes.repeats,
    )
    report.timing(
        f"{BACKBONE} + patch features, batch {sizes.batch}",
        f"{sizes.batch / best['embed']:.1f} images/s ({best['embed'] * 1e3:.1f} ms / batch)",
        "",
        f"compile {compile_seconds:.1f} s; patch features alone "
        f"{best['features'] * 1e3:.1f} ms / batch",
    )


def device_copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Best device memory bandwidth (bytes/s, read + write) of ``x + 1`` on a float32 array."""
    values = jnp.ones(num_bytes // 4, jnp.float32)
    add_one = jax.jit(lambda x: x + 1.0)  # reads and writes every element; cannot be elided
    best = best_times({"copy": lambda: add_one(values)}, repeats)["copy"]
    return 2 * num_bytes / best


def time_coreset(report: Report, sizes: Sizes) -> None:
    """Greedy selection steps on an already projected bank vs the bandwidth floor."""
    bandwidth = device_copy_bandwidth(sizes.copy_bytes, sizes.repeats)
    report.timing(
        f"device copy bandwidth ({sizes.copy_bytes / 2**20:.0f} MiB float32, `x + 1`)",
        f"{bandwidth / 1e9:.0f} GB/s",
        "",
        "read + write bytes; the floor of the coreset steps below",
    )
    rows, steps = sizes.coreset_rows, sizes.coreset_steps
    result = coreset_benchmark.greedy_step_seconds(
        rows, steps, max(2, sizes.repeats // 3), sharding.single_device_mesh()
    )
    per_step = result["seconds_per_step"]
    moved = coreset_benchmark.bytes_per_step(rows)
    floor = moved / bandwidth
    report.timing(
        f"greedy coreset, {rows:,} x {coreset_benchmark.DIM} projected rows",
        f"{per_step * 1e3:.3f} s / 1,000 steps ({moved / per_step / 1e9:.0f} GB/s)",
        f"{floor * 1e3:.3f} s / 1,000 steps (floor / measured {floor / per_step:.2f})",
        f"(time of {steps[1]} steps - time of {steps[0]}) / {steps[1] - steps[0]}; one-off "
        f"setup {result['setup_seconds']:.3f} s",
    )


def time_knn(report: Report, sizes: Sizes) -> None:
    """k-NN and full scoring per image vs a plain HIGHEST-precision matmul of the same FLOPs."""
    rng = np.random.default_rng(1)
    patches, dim, num_images = sizes.knn_patches, sizes.knn_dim, sizes.knn_images
    bank = jnp.asarray(rng.normal(size=(sizes.knn_bank, dim)).astype(np.float32))
    queries = jnp.asarray(rng.normal(size=(num_images * patches, dim)).astype(np.float32))
    patch_features = queries.reshape(num_images, patches, dim)
    grid = int(round(patches**0.5))
    one_image = queries[:patches]
    for precision in ("exact", "fast"):
        if precision == "exact":
            matmul = jax.jit(lambda q, b: jnp.dot(q, b.T, precision=HIGHEST))
            matmul_what = "float32, HIGHEST precision"
        else:
            matmul = jax.jit(
                lambda q, b: jnp.dot(
                    q.astype(jnp.bfloat16),
                    b.astype(jnp.bfloat16).T,
                    preferred_element_type=jnp.float32,
                )
            )
            matmul_what = "bfloat16, float32 accumulation"
        functions: dict[str, Callable] = {
            "matmul": lambda m=matmul: m(queries, bank),
            "knn_batch": lambda p=precision: knn.nearest_neighbors(queries, bank, precision=p),
            "knn_1image": lambda p=precision: knn.nearest_neighbors(one_image, bank, precision=p),
            "score_batch": lambda p=precision: scoring.score_patch_features(
                patch_features,
                bank,
                (grid, grid),
                (sizes.image_size, sizes.image_size),
                precision=p,
            ),
        }
        best = best_times(functions, sizes.repeats)
        flops_per_image = 2.0 * patches * dim * sizes.knn_bank
        matmul_rate = flops_per_image * num_images / best["matmul"]
        floor_ms = flops_per_image / matmul_rate * 1e3
        report.timing(
            f"matmul [{num_images * patches},{dim}] x [{dim},{sizes.knn_bank}], {matmul_what}",
            f"{matmul_rate / 1e12:.2f} TFLOP/s",
            f"{floor_ms:.3f} ms / image",
            f"{flops_per_image / 1e9:.1f} GFLOP per image; the {precision} k-NN floor",
        )
        for key, what, per in (
            ("knn_1image", "`nearest_neighbors`, 1 image", 1),
            ("knn_batch", f"`nearest_neighbors`, batch of {num_images}", num_images),
            (
                "score_batch",
                f"`score_patch_features` (k-NN + maps), batch of {num_images}",
                num_images,
            ),
        ):
            per_image = best[key] / per
            rate = flops_per_image / per_image / 1e12
            report.timing(
                f"{precision}: {what}: {patches} x {dim} queries per image, "
                f"{sizes.knn_bank:,}-row bank",
                f"{per_image * 1e3:.3f} ms / image ({rate:.2f} TFLOP/s)",
                f"{floor_ms:.3f} ms / image (floor / measured {floor_ms / (per_image * 1e3):.2f})",
                "k = 1, squared L2, default tiles",
            )
    time_certified_knn(report, sizes)


def time_certified_knn(report: Report, sizes: Sizes) -> None:
    """The certified k-NN (exact mode's answer from low-rank candidates, proof and fallback)
    against the plain exact scan, on features with structure like real ones (decaying scales,
    queries near bank rows; isotropic noise would prove nothing): its certified fraction and
    its rate in exact-scan FLOPs per second, to decide ``programs.backend_numerics`` here."""
    rng = np.random.default_rng(2)
    dim, num_queries = sizes.knn_dim, sizes.knn_images * sizes.knn_patches
    scales = np.geomspace(1.0, 1e-2, dim)
    centres = np.repeat(rng.standard_normal((sizes.knn_bank // 8, dim)), 8, axis=0)
    bank = (centres + 0.1 * rng.standard_normal(centres.shape)) * scales
    near = bank[rng.integers(0, len(bank), num_queries)]
    queries = near + 0.1 * rng.standard_normal(near.shape) * scales
    bank, queries = (jnp.asarray(x.astype(np.float32)) for x in (bank, queries))
    search = knn.low_rank_search(bank)
    options = {"candidate_search": "low-rank", "search": search, "with_fallbacks": True}
    plain = knn.nearest_neighbors(queries, bank)
    certified = knn.nearest_neighbors(queries, bank, **options)
    if certified[2] is None:
        report.skip("certified k-NN", f"bank under knn.CERTIFIED_MIN_ROWS rows ({len(bank)})")
        return
    same = bool(np.array_equal(np.asarray(plain[1]), np.asarray(certified[1])))
    fraction = 1.0 - float(np.mean(np.asarray(certified[2])))
    report.check(
        "certified k-NN: the plain exact scan's neighbours",
        same,
        f"indices {'identical' if same else 'differ'}, {fraction:.4%} certified",
        "identical indices",
    )
    best = best_times(
        {
            "plain": lambda: knn.nearest_neighbors(queries, bank),
            "certified": lambda: knn.nearest_neighbors(queries, bank, **options),
        },
        sizes.repeats,
    )
    flops = 2.0 * num_queries * dim * len(bank)
    for name, seconds in best.items():
        report.timing(
            f"exact, {name}: {num_queries} x {dim} queries, {len(bank):,}-row bank",
            f"{seconds * 1e3:.1f} ms ({flops / seconds / 1e12:.2f} exact-scan TFLOP/s)",
            "",
            f"certified for {fraction:.4%} of the queries" if name == "certified" else "",
        )


DEMO = REPO_ROOT / "data" / "mvtec_ad_demo" / "bottle"
BOTTLE_TRAIN_IMAGES = 209  # MVTec AD bottle: 209 training images -> N = 163,856 patches
BOTTLE_BACKBONES = ("mobilenet_v2", BACKBONE)


def bottle_images(sizes: Sizes) -> tuple[np.ndarray, np.ndarray]:
    """Bottle-sized work from the shipped demo category (nothing from ``../shared``):
    ``(train [209, 224, 224, 3], test [83, ...])`` uint8; the 70 demo training images are
    used as they are, flipped left-right and flipped up-down (209 distinct images)."""
    from patchcore_jax import preprocess
    from patchcore_jax.datasets.folders import load_dataset

    dataset = load_dataset(DEMO)
    train = preprocess.load_images(dataset.train_paths[: sizes.bottle_train_sources])
    train = np.concatenate([train, train[:, :, ::-1], train[:, ::-1]])
    test = preprocess.load_images([s.image_path for s in dataset.test_samples])
    return train[: sizes.bottle_train], test[: sizes.bottle_test]


def time_bottle(report: Report, sizes: Sizes) -> None:
    """Bottle-sized fit and predict for each backbone and precision: fit phases after
    compilation (a second fit in the same process), compile seconds (first fit minus second),
    agreement of ``fast`` with ``exact``, and steady-state predict images/s per batch size."""
    from scipy.stats import spearmanr

    from patchcore_jax.backbones import load_backbone

    train, test = bottle_images(sizes)
    repeats = -(-sizes.predict_total // len(test))
    stream = np.concatenate([test] * repeats)[: sizes.predict_total]
    for name in BOTTLE_BACKBONES:
        backbone = load_backbone(name) if name == "mobilenet_v2" else init_backbone(name)
        exact_scores = None
        for precision in ("exact", "fast"):
            config = PatchCoreConfig(backbone=name, precision=precision, batch_size=sizes.batch)
            what = f"bottle {name} ({backbone.weights_sha256[:12]}), {precision}"
            fits = []
            for _ in range(2):  # the first compiles, the second is the steady state
                log: list[str] = []
                model = PatchCore(config, backbone=backbone)
                start = time.perf_counter()
                model.fit(train, log=log.append)
                jax.block_until_ready(model.memory_bank)
                fits.append((seconds(start), log))
            (first, _), (second, log) = fits
            phases = ", ".join(
                line.split(":")[0] + " " + match.group(1) + " s"
                for line in log
                if (match := re.search(r" in ([0-9.]+) s", line))
            )
            report.timing(
                f"{what}: fit {len(train)} images -> {model.memory_bank.shape[0]:,} bank rows",
                f"{second:.2f} s ({len(train) / second:.0f} images/s)",
                "",
                f"after compilation: {phases}; compile (first fit - second) {first - second:.1f} s",
            )
            scores = model.predict(test).image_scores
            if precision == "exact":
                exact_scores = scores
            else:
                rho = float(spearmanr(scores, exact_scores).statistic)
                report.check(
                    f"{name} fast vs exact image scores (Spearman, {len(test)} images)",
                    rho >= 0.99,
                    f"{rho:.5f}",
                    ">= 0.99",
                )
            for batch in sizes.predict_batches:
                model = PatchCore(
                    config.replace(batch_size=batch),
                    backbone=model.backbone,
                    memory_bank=model.memory_bank,
                )
                model.predict(stream[:batch])  # compile
                start = time.perf_counter()
                model.predict(stream)
                elapsed = seconds(start)
                report.timing(
                    f"{what}: predict, batch {batch}",
                    f"{len(stream) / elapsed:.0f} images/s",
                    "",
                    f"{len(stream)} images from host uint8 arrays, after compilation",
                )


PARTS: dict[str, Callable[[Report, Sizes], None]] = {
    "correctness": check_correctness,
    "backbone": time_backbone,
    "coreset": time_coreset,
    "knn": time_knn,
    "bottle": time_bottle,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.md")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny sizes: a CPU smoke test of this script, not a measurement",
    )
    args = parser.parse_args()

    sizes = SMALL if args.small else Sizes()
    report = Report(args.out, sizes, args.small)
    print(f"jax {jax.__version__} on {jax.devices()}; fixtures {FIXTURES}", flush=True)
    run_start = time.perf_counter()
    for part in args.parts:
        start = time.perf_counter()
        print(f"--- {part}", flush=True)
        try:
            PARTS[part](report, sizes)
        except Exception as error:  # record it and go on: one run must report every part
            traceback.print_exc()
            report.error(part, error)
        print(f"--- {part} done in {seconds(start):.1f} s", flush=True)
        report.write()
    text = report.write()
    print(text)
    print(f"total {seconds(run_start):.0f} s; wrote {args.out}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
