"""Backbone rate: embedding images/s and GFLOP/s against the float32 matmul rate, this tree vs
another checkout (e.g. a ``git worktree`` of the previous main), fresh processes, alternating.

    python benchmarks/backbone_rate.py --baseline PATH [--names wide_resnet50_2 ...]
        [--rounds 3] [--batches 4] [--conv-shapes] [--xla-flags FLAGS] [--out PATH]

Each worker (a fresh process importing ``patchcore_jax`` from its tree) measures, in this order:
the float32 matmul rate (``jnp.dot`` of two 2048 x 2048 matrices, best of 5); the fit's
embedding (``PatchCore.embed``: the backbone and the patch features in the fit's batches of
``PatchCoreConfig().batch_size`` 224 px images, after one compiling batch); the backbone alone
(jitted ``module.apply`` on one batch); and, with ``--conv-shapes``, each distinct convolution of
the backbone alone (jitted ``lax.conv_general_dilated`` of its shapes) times its count. Wall
seconds and process CPU seconds are both recorded: on a shared machine the CPU seconds (summed
over the intra-op threads) are the steadier measure of the work done. FLOPs are XLA's cost
analysis of the compiled embedding. Features of the timed images are hashed, so the table says
whether both trees computed the same bits. ResNets use random weights (same cost as the real
ones); MobileNetV2 its shipped TFLite weights. ``--xla-flags`` runs this tree's workers with
``XLA_FLAGS`` set (the baseline's never), to try XLA:CPU options side by side, bits included.
The results file's hand-written section from ``NOTES_HEADING`` on is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS, machine, write_results

NAMES = ("wide_resnet50_2", "resnet18", "mobilenet_v2")
IMAGE_SIZE = 224
# Hand-written notes below this heading in the results file survive a rerun.
NOTES_HEADING = "## What was tried"


def timed(function, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``repeats`` calls of ``function()``."""
    import jax

    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(function())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def matmul_rate() -> dict[str, float]:
    """GFLOP/s (wall, CPU) of a float32 2048 x 2048 matmul, best of 5."""
    import jax
    import jax.numpy as jnp

    size = 2048
    left = jnp.ones((size, size), jnp.float32)
    right = jnp.full((size, size), 0.5, jnp.float32)
    product = jax.jit(jnp.dot)
    jax.block_until_ready(product(left, right))
    wall, cpu = timed(lambda: product(left, right), 5)
    flops = 2 * size**3
    return {"matmul_gflops": flops / wall / 1e9, "matmul_gflops_cpu": flops / cpu / 1e9}


def conv_seconds(module, variables, images) -> dict[str, float]:
    """Best wall and CPU seconds of the backbone's convolutions run one by one (jitted
    ``lax.conv_general_dilated`` of each distinct shape, times its count)."""
    import jax
    import numpy as np

    jaxpr = jax.make_jaxpr(module.apply)(variables, images)
    shapes: dict[tuple, tuple[int, dict]] = {}
    for equation in jaxpr.jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            lhs, rhs = (var.aval.shape for var in equation.invars)
            key = (lhs, rhs, repr(sorted(equation.params.items())))
            count, _ = shapes.get(key, (0, None))
            shapes[key] = (count + 1, equation.params)
    rng = np.random.default_rng(0)
    wall_total = cpu_total = 0.0
    for (lhs_shape, rhs_shape, _), (count, params) in shapes.items():
        conv = jax.jit(functools.partial(jax.lax.conv_general_dilated_p.bind, **params))
        lhs = jax.numpy.asarray(rng.standard_normal(lhs_shape, np.float32))
        rhs = jax.numpy.asarray(rng.standard_normal(rhs_shape, np.float32))
        jax.block_until_ready(conv(lhs, rhs))
        wall, cpu = timed(lambda conv=conv, lhs=lhs, rhs=rhs: conv(lhs, rhs), 3)
        wall_total += wall * count
        cpu_total += cpu * count
    num_convs = sum(count for count, _ in shapes.values())
    return {"conv_wall_s": wall_total, "conv_cpu_s": cpu_total, "convs": num_convs}


def worker(name: str, batches: int, conv_shapes: bool) -> dict:
    """One tree's measurements of backbone ``name`` (see the module docstring)."""
    import jax
    import numpy as np

    from patchcore_jax import PatchCore, PatchCoreConfig, features
    from patchcore_jax.backbones import init_backbone, load_backbone

    result = matmul_rate()
    config = PatchCoreConfig(backbone=name)
    backbone = load_backbone(name) if name == "mobilenet_v2" else init_backbone(name)
    model = PatchCore(config, backbone=backbone)
    batch = config.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, ((batches + 1) * batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    start = time.perf_counter()
    for patch_features, _ in model.embed(images[:batch]):  # compiles
        jax.block_until_ready(patch_features)
    result["first_batch_s"] = time.perf_counter() - start
    digest = hashlib.sha1()
    wall, cpu = time.perf_counter(), time.process_time()
    for patch_features, _ in model.embed(images[batch:]):
        digest.update(np.asarray(jax.block_until_ready(patch_features)).tobytes())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    num_images = batches * batch
    embed = functools.partial(
        features.embed_images,
        model.backbone.module,
        pretrain_embed_dimension=config.pretrain_embed_dimension,
        target_embed_dimension=config.target_embed_dimension,
        patch_size=config.patch_size,
    )
    one_batch = jax.numpy.asarray(images[:batch])
    variables = model.backbone.variables
    cost = jax.jit(embed).lower(variables, one_batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    apply = jax.jit(model.backbone.module.apply)
    jax.block_until_ready(apply(variables, one_batch))
    backbone_wall, backbone_cpu = timed(lambda: apply(variables, one_batch), 2)
    result.update(
        batch_size=batch,
        images=num_images,
        images_per_s=num_images / wall,
        cpu_s_per_image=cpu / num_images,
        gflop_per_image=cost["flops"] / batch / 1e9,
        backbone_cpu_s_per_image=backbone_cpu / batch,
        features_sha1=digest.hexdigest()[:12],
    )
    if conv_shapes:
        seconds = conv_seconds(model.backbone.module, variables, one_batch)
        result["conv_cpu_s_per_image"] = seconds["conv_cpu_s"] / batch
        result["convs"] = seconds["convs"]
    return result


def run_worker(tree: Path, name: str, args: argparse.Namespace) -> dict:
    """``worker`` in a fresh process importing ``patchcore_jax`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if args.xla_flags and tree == REPO_ROOT:
        env["XLA_FLAGS"] = args.xla_flags
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    command += ["--batches", str(args.batches), *(["--conv-shapes"] if args.conv_shapes else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary_rows(name: str, runs: dict[str, list[dict]]) -> list[str]:
    """One table row per tree: median/best images/s, CPU s per image, rates, identical bits."""
    rows = []
    reference = {run["features_sha1"] for run in runs["baseline"]}
    for tree, tree_runs in runs.items():
        rates = [run["images_per_s"] for run in tree_runs]
        cpu = statistics.median(run["cpu_s_per_image"] for run in tree_runs)
        backbone_cpu = statistics.median(run["backbone_cpu_s_per_image"] for run in tree_runs)
        gflop = tree_runs[0]["gflop_per_image"]
        matmul = max(run["matmul_gflops"] for run in tree_runs)
        matmul_cpu = statistics.median(run["matmul_gflops_cpu"] for run in tree_runs)
        conv = [run["conv_cpu_s_per_image"] for run in tree_runs if "conv_cpu_s_per_image" in run]
        conv_share = f"{statistics.median(conv) / cpu:.0%}" if conv else "-"
        rate = gflop * max(rates)
        same = {run["features_sha1"] for run in tree_runs} == reference and len(reference) == 1
        rows.append(
            f"| {name} | {tree} | {tree_runs[0]['batch_size']} | {max(rates):.2f} | "
            f"{statistics.median(rates):.2f} | {cpu:.3f} | {backbone_cpu / cpu:.0%} | "
            f"{conv_share} | {gflop:.1f} | {rate:.0f} ({rate / matmul:.0%} of {matmul:.0f}) | "
            f"{gflop / cpu:.0f} ({gflop / cpu / matmul_cpu:.0%} of {matmul_cpu:.0f}) | "
            f"{'yes' if same else 'NO'} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="the previous main (a checkout)")
    parser.add_argument("--names", nargs="+", default=list(NAMES), help="backbones")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per backbone")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per worker")
    parser.add_argument("--conv-shapes", action="store_true", help="time each convolution too")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS of this tree's workers")
    parser.add_argument("--out", type=Path, default=RESULTS / "backbone_rate.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batches, args.conv_shapes)))
        return 0
    if args.baseline is None or not (args.baseline / "patchcore_jax").is_dir():
        parser.error(f"--baseline must be a checkout holding patchcore_jax/, got {args.baseline}")
    trees = {"baseline": args.baseline.resolve(), "this tree": REPO_ROOT}
    load_before = os.getloadavg()[0]
    runs: dict[str, dict[str, list[dict]]] = {
        name: {tree: [] for tree in trees} for name in args.names
    }
    for round_index in range(args.rounds):
        order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
        for name in args.names:
            for tree in order:
                result = run_worker(trees[tree], name, args)
                runs[name][tree].append(result)
                print(f"round {round_index} {name} {tree}: {result}", flush=True)
    load_after = os.getloadavg()[0]
    table = [
        "| backbone | tree | batch | img/s best | img/s median | CPU s / img | backbone share "
        "of CPU | convs' share of CPU | GFLOP / img | GFLOP/s best (of matmul GFLOP/s) | "
        "GFLOP / CPU s (of matmul's) | same features as baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    ratios = []
    for name in args.names:
        table += summary_rows(name, runs[name])
        best = {tree: max(r["images_per_s"] for r in runs[name][tree]) for tree in trees}
        ratios.append(f"{name} {best['this tree'] / best['baseline']:.2f}x")
    body = [
        f"{args.rounds} rounds, trees alternating, a fresh process per measurement; "
        f"{args.batches} timed batches of 224 px random uint8 images per worker through "
        "`PatchCore.embed` (backbone + patch features, the fit's batches) after one compiling "
        "batch. ResNets: random init; MobileNetV2: shipped weights. Matmul: float32 2048^3 "
        "`jnp.dot` in the same worker. CPU s: process CPU time (all threads). Backbone share: "
        "jitted `module.apply` alone; convs' share (`--conv-shapes`): each convolution run alone.",
        "",
        *table,
        "",
        "This tree's best images/s over the baseline's: " + ", ".join(ratios) + ".",
    ]
    notes = kept_notes(args.out)
    text = write_results(
        args.out,
        "Backbone rate: embedding against the matmul rate, side by side",
        machine("cpu"),
        [
            f"Baseline: {args.baseline} (git {git_head(args.baseline)}); this tree: git "
            f"{git_head(REPO_ROOT)}",
            f"XLA_FLAGS of this tree's workers: `{args.xla_flags or '(none)'}`",
            f"1-minute load average before / after: {load_before:.1f} / {load_after:.1f}",
        ],
        [*body, *notes],
    )
    print(text)
    return 0


def kept_notes(path: Path) -> list[str]:
    """The lines of ``path`` from ``NOTES_HEADING`` on (none if absent), preceded by a blank."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if NOTES_HEADING not in lines:
        return []
    return ["", *lines[lines.index(NOTES_HEADING) :]]


def git_head(tree: Path) -> str:
    """Short commit of ``tree`` ("?" when not a git checkout)."""
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
