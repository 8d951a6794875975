"""Export round trip: `patchcore-jax export`, then `exported.load` in a process without flax or
orbax, equal to `predict` for two batch sizes from one file; bad files give one clear error."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import float_rounding
import jax
import numpy as np
import pytest
from conftest import BOTTLE
from test_cli import run_cli

from patchcore_jax import PatchCore, PatchCoreConfig, checkpoint, export, exported, scoring
from patchcore_jax import calibration as calibration_module
from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.preprocess import load_images

LOADER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from patchcore_jax import exported

    model = exported.load(sys.argv[1])
    images = np.load(sys.argv[2])
    outputs = [model(images[:2]), model(images[2:])]  # batch sizes 2 and 3, one file
    heavy = sorted(
        name for name in sys.modules
        if name.split(".")[0] in ("flax", "orbax", "optax", "torch", "tensorflow")
        or name in ("patchcore_jax.model", "patchcore_jax.backbones", "patchcore_jax.checkpoint")
    )
    assert not heavy, heavy
    np.savez(
        sys.argv[3],
        **{key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]},
    )
    print(",".join(model.metadata["platforms"]))
    """
)


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """(model, its export file, 5 test images): 4 training images, default calibration."""
    folder = tmp_path_factory.mktemp("export")
    bottle = load_dataset(BOTTLE)
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05)
    model = PatchCore(config).fit(load_images(bottle.train_paths[::50]))
    checkpoint.save(model, folder / "model")
    result = run_cli("export", folder / "model", "--out", folder / "model.pcjx")
    assert "exported" in result.stderr
    test_images = load_images(bottle.test_image_paths[::17])
    return model, folder / "model.pcjx", test_images


def test_exported_program_equals_predict_in_a_process_without_flax_or_orbax(
    exported_model, tmp_path
):
    model, path, images = exported_model
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, path, tmp_path / "images.npy", tmp_path / "out.npz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1].split(",")[0] == "cpu"
    outputs = np.load(tmp_path / "out.npz")
    prediction = model.predict(images)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    calibration = model.calibration
    np.testing.assert_allclose(outputs["image_scores"], scores, rtol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_maps"], maps, rtol=1e-5, atol=1e-5 * maps.max())
    np.testing.assert_allclose(
        outputs["normalized_scores"], calibration.normalize_image_scores(scores), atol=1e-6
    )
    np.testing.assert_array_equal(outputs["decisions"], scores >= calibration.image_threshold)
    assert 0 < outputs["decisions"].sum() < len(images)  # good and defective images in the set


CACHED_LOADER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax import monitoring
    from patchcore_jax import exported

    events = []
    monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
    exported.load(sys.argv[1], compile_cache=False)
    opted_out = jax.config.jax_compilation_cache_dir
    model = exported.load(sys.argv[1])  # the default: $PATCHCORE_COMPILE_CACHE
    model(np.load(sys.argv[2]))
    print(opted_out, jax.config.jax_compilation_cache_dir,
          events.count("/jax/compilation_cache/cache_hits"))
    """
)


def test_a_new_process_reuses_the_exported_programs_compilation_from_the_cache(
    exported_model, tmp_path
):
    """``exported.load`` turns on the persistent compilation cache (opt-out): a second process
    calling the same batch size reads the compiled program instead of compiling it again."""
    _, path, images = exported_model
    np.save(tmp_path / "images.npy", images[:2])
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # JAX keeps programs that compile in >= 1 s; this small model's may be faster.
    env.update(PATCHCORE_COMPILE_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", CACHED_LOADER, path, tmp_path / "images.npy"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs.append((result.stdout.split(), sorted(p.name for p in cache.iterdir())))
    (first, first_entries), (second, second_entries) = runs
    assert first == ["None", str(cache), "0"] and first_entries  # compiled, then stored
    assert second[:2] == ["None", str(cache)] and int(second[2]) >= 1  # read back
    assert second_entries == first_entries  # nothing compiled anew


def test_export_records_the_format_version_and_config(exported_model):
    model, path, _ = exported_model
    loaded = exported.load(path)
    assert loaded.metadata["format_version"] == exported.FORMAT_VERSION
    assert PatchCoreConfig.from_dict(loaded.metadata["config"]) == model.config
    assert loaded.metadata["calibration"]["image_threshold"] == model.calibration.image_threshold
    assert "cpu" in loaded.metadata["platforms"]


def test_missing_corrupt_and_other_version_export_files_are_refused(exported_model, tmp_path):
    _, path, _ = exported_model
    with pytest.raises(FileNotFoundError, match="no exported model at"):
        exported.load(tmp_path / "missing.pcjx")
    (tmp_path / "junk.pcjx").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a patchcore-jax export file"):
        exported.load(tmp_path / "junk.pcjx")
    data = path.read_bytes()
    (tmp_path / "cut.pcjx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        exported.load(tmp_path / "cut.pcjx")
    metadata, program = exported.read_checksummed(path, exported.KIND, exported.FORMAT_VERSION, "")
    future = exported.FORMAT_VERSION + 1
    exported.write_checksummed(
        tmp_path / "future.pcjx", exported.KIND, future, metadata, program, "program"
    )
    with pytest.raises(ValueError, match=f"format version {future}"):
        exported.load(tmp_path / "future.pcjx")


def test_export_bad_input_is_one_line_naming_it(exported_model, tmp_path):
    model_dir = exported_model[1].with_name("model")
    cases = [
        (["export", tmp_path / "nothing", "--out", tmp_path / "x.pcjx"], "no checkpoint"),
        (["export", model_dir, "--out", tmp_path / "no/such/x.pcjx"], str(tmp_path / "no/such")),
        (["export", model_dir, "--out", tmp_path], "is a folder"),
        (["export", model_dir, "--out", "x", "--platforms", "rocm"], "--platforms"),
    ]
    for args, reason in cases:
        result = run_cli(*args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and reason in lines[0], result.stderr


def sections(data: bytes) -> tuple[int, int]:
    """(offset of the metadata, offset of the program) in an export file's bytes."""
    lines = data.split(b"\n", 3)
    start = sum(len(line) + 1 for line in lines[:3])
    return start, start + int(lines[1].split()[1])


def test_flipped_program_or_metadata_bytes_truncation_and_an_edited_threshold_are_refused(
    exported_model, tmp_path
):
    _, path, _ = exported_model
    data = path.read_bytes()
    metadata_start, program_start = sections(data)
    flipped_program = bytearray(data)
    middle = (program_start + len(data)) // 2
    flipped_program[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    flipped_metadata = bytearray(data)
    flipped_metadata[metadata_start + 5] ^= 0x01
    threshold = json.loads(data[metadata_start:program_start])["calibration"]["image_threshold"]
    text = f'"image_threshold": {threshold!r}'
    digit = next(c for c in text if c.isdigit())
    edited = data.replace(text.encode(), text.replace(digit, str(9 - int(digit)), 1).encode())
    assert edited != data and len(edited) == len(data)  # same length: only the sha256 tells
    cases = {
        "program.pcjx": (bytes(flipped_program), "its program does not match its sha256"),
        "metadata.pcjx": (bytes(flipped_metadata), "its metadata does not match its sha256"),
        "edited.pcjx": (edited, "its metadata does not match its sha256"),
        "short.pcjx": (data[:-1], "truncated"),
        "long.pcjx": (data + b"\0", "longer than its header says"),
        "header.pcjx": (data.replace(b"sha256:", b"sha256-", 1), "header lines"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=reason) as error:
            exported.load(tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_a_format_1_export_is_refused_with_a_re_export_message(exported_model, tmp_path):
    _, path, _ = exported_model
    metadata, program = exported.read_checksummed(path, exported.KIND, exported.FORMAT_VERSION, "")
    header = json.dumps({**metadata, "format_version": 1}).encode()  # format 1's layout
    old = tmp_path / "old.pcjx"
    old.write_bytes(
        b"patchcore-jax export\n" + len(header).to_bytes(8, "little") + header + program
    )
    with pytest.raises(ValueError, match="format version 1;.*export the model again") as error:
        exported.load(old)
    assert str(old) in str(error.value)


def test_the_decisions_and_normalisation_applied_are_those_of_the_metadata(
    exported_model, tmp_path
):
    model, path, images = exported_model
    metadata, program = exported.read_checksummed(path, exported.KIND, exported.FORMAT_VERSION, "")
    threshold = 0.0  # below every score: every image anomalous, unlike with the model's own
    calibration = {**metadata["calibration"], "image_threshold": threshold}
    edited = tmp_path / "edited.pcjx"
    exported.write_checksummed(
        edited,
        exported.KIND,
        exported.FORMAT_VERSION,
        {**metadata, "calibration": calibration},
        program,
        "program",
    )
    outputs = exported.load(edited)(images)
    assert outputs["decisions"].all()
    assert not (outputs["image_scores"] >= model.calibration.image_threshold).all()
    np.testing.assert_array_equal(
        outputs["normalized_scores"],
        calibration_module.normalize(
            outputs["image_scores"], threshold, calibration["image_min"], calibration["image_max"]
        ),
    )
    calibration["image_threshold"] = float("nan")
    with pytest.raises(ValueError, match="not JSON compliant"):  # never written
        exported.write_checksummed(
            edited, exported.KIND, 2, {**metadata, "calibration": calibration}, program, "program"
        )
    # Read as infinity: a forged file with valid checksums is still refused.
    header = json.dumps({**metadata, "calibration": calibration}).replace("NaN", "1e999").encode()
    lines = [f"patchcore-jax export {exported.FORMAT_VERSION}"] + [
        f"{name} {len(part)} sha256:{hashlib.sha256(part).hexdigest()}"
        for name, part in (("metadata", header), ("program", program))
    ]
    edited.write_bytes("\n".join(lines).encode() + b"\n" + header + program)
    with pytest.raises(ValueError, match="is not finite numbers; refit") as error:
        exported.load(edited)
    assert str(edited) in str(error.value)


def test_an_empty_or_wrong_shaped_batch_is_one_value_error_stating_the_expected_shape(
    exported_model,
):
    _, path, images = exported_model
    loaded = exported.load(path)
    height, width = loaded.image_shape
    bad = [images[:0], images[0], images[:1, :-1], images[:1].astype(np.float32)]
    for batch in bad:
        expected = f"uint8 [B, {height}, {width}, 3] preprocessed crops with B >= 1"
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            loaded(batch)
        assert str(batch.shape) in str(error.value) and "\n" not in str(error.value)


def test_export_refuses_to_replace_a_file_that_is_not_an_export_unless_overwrite(
    exported_model, tmp_path
):
    model_dir = exported_model[1].with_name("model")
    user_file = tmp_path / "notes.txt"
    user_file.write_text("my notes\n")
    result = run_cli("export", model_dir, "--out", user_file, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(user_file) in lines[0] and "--overwrite" in lines[0]
    assert user_file.read_text() == "my notes\n"
    assert export.check_export_target(user_file, overwrite=True) == user_file
    assert export.check_export_target(exported_model[1]) == exported_model[1]  # an export


def test_export_never_writes_inside_a_checkpoint_folder(exported_model, tmp_path):
    model_dir = exported_model[1].with_name("model")
    pointer = (model_dir / "CURRENT").read_bytes()
    result = run_cli(
        "export", model_dir, "--out", model_dir / "CURRENT", "--overwrite", check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"inside the checkpoint folder {model_dir}" in lines[0]
    assert (model_dir / "CURRENT").read_bytes() == pointer
    unfinished = tmp_path / "unfinished"  # a first save killed before CURRENT was written
    (unfinished / "v000001").mkdir(parents=True)
    version = model_dir / pointer.decode().strip()
    inside = [model_dir / "x.pcjx", version / "x.pcjx", unfinished / "x.pcjx"]
    (tmp_path / "link").symlink_to(model_dir)
    for path in [*inside, tmp_path / "link" / "x.pcjx"]:
        with pytest.raises(FileExistsError, match="inside the checkpoint folder"):
            export.check_export_target(path, overwrite=True)
        assert not path.exists()
    assert export.check_export_target(tmp_path / "x.pcjx") == tmp_path / "x.pcjx"


def test_export_replaces_a_previous_export_atomically(exported_model, tmp_path, monkeypatch):
    model, path, _ = exported_model
    previous = tmp_path / "model.pcjx"
    shutil.copyfile(path, previous)
    before = previous.read_bytes()

    def fail_midway(target, kind, version, metadata, payload, payload_name):
        with open(target, "wb") as file:
            file.write(payload[: len(payload) // 2])
        raise OSError(f"No space left on device: {target}")

    with monkeypatch.context() as patched:
        patched.setattr(exported, "write_checksummed", fail_midway)
        with pytest.raises(OSError, match="No space left"):
            export.export_model(model, previous, platforms=["cpu"])
    assert previous.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pcjx"]  # no temporary left
    inode = previous.stat().st_ino
    metadata = export.export_model(model, previous, platforms=["cpu"])
    assert previous.stat().st_ino != inode  # a new file renamed over the old one
    assert exported.load(previous).metadata["calibration"] == metadata["calibration"]


# ----------------------------------------------------------------------------------------------
# Batched programs and banks as inputs (tiny crops: 64 x 64, an 8 x 8 patch grid)

TINY = {"backbone": "mobilenet_v2", "resize": 72, "crop": 64, "coreset_fraction": 0.03}


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Two "categories" of one line fitted with the same options: 34 training crops each (65
    bank rows, bucket 66); the program exported from ``a`` with ``--bank-out``, the bank of
    ``b`` alone (``export_bank``); 69 training and 4 test crops."""
    folder = tmp_path_factory.mktemp("line")
    bottle = load_dataset(BOTTLE)
    train = load_images(bottle.train_paths[:69], 72, 64)
    test = load_images(bottle.test_image_paths[::17][:4], 72, 64)
    config = PatchCoreConfig(**TINY, batch_size=4)
    first = PatchCore(config).fit(train[:34])
    second = PatchCore(config, backbone=first.backbone).fit(train[34:68])
    checkpoint.save(first, folder / "a")
    program, bank = folder / "line.pcjx", folder / "a.pcjb"
    result = run_cli(
        "export", folder / "a", "--out", program, "--bank-out", bank, "--platforms", "cpu"
    )
    assert f"{program} (program for cpu); {bank} (bank of 65 rows)" in result.stderr
    export.export_bank(second, folder / "b.pcjb")
    return types.SimpleNamespace(
        folder=folder, train=train, test=test, models={"a": first, "b": second}
    )


def with_bank(config, model, rows=None):
    """A ``config`` model with ``model``'s backbone, calibration and first ``rows`` bank rows."""
    bank = np.asarray(model.memory_bank)[:rows]
    other = PatchCore(config, backbone=model.backbone, memory_bank=bank)
    other.calibration = model.calibration
    return other


def rounding_bounds(model, images, image_scores):
    """``(score bound [N], map bound [N])``: how far two float32 computations of ``images``'
    image scores and maps may differ when only their summation orders differ (batch size,
    tiling, kernels), for k = 1, squared L2, no reweighting.

    Every float32 squared distance of a patch q to a bank row b is within
    ``e = gamma_{D+2} (|q|^2 + |b|^2 + 2 sum |q_i b_i|)`` of the exact one in any summation
    order (``float_rounding.squared_distance_error``), so a patch score (a min over rows) and an
    image score (a max over patches) are within the image's largest ``e`` of the exact ones:
    two runs differ by at most ``2 e``. A map is ``R S C^T`` with non-negative ``R`` [H, h],
    ``C`` [W, w] applied to the patch scores ``S``: each run adds at most
    ``gamma_{h+w} max S`` (scaled by R's and C's row sums) to ``R |dS| C^T``.
    """
    dim = model.config.target_embed_dimension
    queries = np.abs(model.patch_features(images).astype(np.float64))
    queries = queries.reshape(len(images), -1, dim)
    bank = np.abs(np.asarray(model.memory_bank, np.float64))
    terms = (
        np.sum(queries**2, -1)[:, :, None] + np.sum(bank**2, -1)[None, None] + 2 * queries @ bank.T
    )
    distance_error = float_rounding.gamma(dim + 2) * terms.max(axis=(1, 2))
    (grid_h, grid_w), (height, width) = model.grid_shape, model.image_shape
    sigma = model.config.anomaly_map_sigma
    row_sums = [
        np.abs(scoring.anomaly_map_matrix(grid, out, sigma)).sum(1).max()
        for grid, out in ((grid_h, height), (grid_w, width))
    ]
    largest_patch_score = np.abs(image_scores) + distance_error
    map_rounding = float_rounding.gamma(grid_h + grid_w) * largest_patch_score
    return 2 * distance_error, row_sums[0] * row_sums[1] * 2 * (distance_error + map_rounding)


def assert_within_rounding(outputs, model, images):
    """``outputs`` of an exported program equal ``model.predict(images)`` to float32 rounding
    (``rounding_bounds``), and its decisions and normalisation are the model's."""
    prediction = model.predict(images)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    score_bound, map_bound = rounding_bounds(model, images, scores)
    assert np.all(np.abs(outputs["image_scores"] - scores) <= score_bound)
    map_error = np.abs(outputs["anomaly_maps"] - maps).max(axis=(1, 2))
    assert np.all(map_error <= map_bound)
    calibration = model.calibration
    threshold = calibration.image_threshold
    decided = np.abs(scores - threshold) > score_bound  # not within rounding of the threshold
    np.testing.assert_array_equal(outputs["decisions"][decided], scores[decided] >= threshold)


def test_the_exported_program_scores_the_whole_batch_at_once_within_rounding_of_predict(line):
    """No ``lax.map`` over images: the backbone's convolutions take the whole batch; the loaded
    program equals ``predict`` at the same batch size (4) and at batch size 1, within the
    derived float32 rounding bound (``rounding_bounds``)."""
    model = line.models["a"]
    text = str(jax.make_jaxpr(export.export_function(model))(line.test[:3]))
    convs = [line.split("=")[0] for line in text.splitlines() if "conv_general_dilated[" in line]
    assert convs and all(":f32[3," in out.replace(" ", "") for out in convs), convs[:3]
    loaded = exported.load(line.folder / "line.pcjx", bank=line.folder / "a.pcjb")
    for images in (line.test, line.test[:1]):
        assert_within_rounding(loaded(images), model, images)


def test_one_program_runs_another_categorys_bank_with_that_models_predict_scores(line, tmp_path):
    """The program exported from ``a`` runs ``b``'s bank: ``b``'s predict scores, maps and
    decisions (its calibration, from the bank file). Fast models too: their low-rank search
    arrays travel in the bank file."""
    loaded = exported.load(line.folder / "line.pcjx", bank=line.folder / "b.pcjb")
    outputs = loaded(line.test)
    first, second = line.models["a"], line.models["b"]
    assert_within_rounding(outputs, second, line.test)
    assert not np.allclose(outputs["image_scores"], first.predict(line.test).image_scores)
    calibration = second.calibration
    assert loaded.bank_metadata["calibration"]["image_threshold"] == calibration.image_threshold
    np.testing.assert_array_equal(
        outputs["normalized_scores"], calibration.normalize_image_scores(outputs["image_scores"])
    )
    assert loaded.metadata["calibration"] is None  # the bank file's is applied
    assert [spec[0] for spec in loaded.metadata["bank_inputs"]] == ["memory_bank", "num_valid"]
    fast_config = first.config.replace(precision="fast")
    fast_first, fast_second = with_bank(fast_config, first), with_bank(fast_config, second)
    assert fast_second.candidate_search == "low-rank"
    program, bank = tmp_path / "fast.pcjx", tmp_path / "b.pcjb"
    export.export_model(fast_first, program, bank_path=tmp_path / "a.pcjb", platforms=["cpu"])
    export.export_bank(fast_second, bank)
    loaded = exported.load(program, bank=bank)
    names = [spec[0] for spec in loaded.bank_metadata["arrays"]]
    assert names == ["memory_bank", "num_valid", "search_0", "search_1"]
    assert_within_rounding(loaded(line.test), fast_second, line.test)


def test_a_bank_of_another_configuration_or_bucket_is_refused_naming_both_files(
    line, exported_model, tmp_path
):
    program, first = line.folder / "line.pcjx", line.models["a"]
    config = first.config
    cases = {
        "sigma.pcjb": (
            with_bank(config.replace(anomaly_map_sigma=2.0), first),
            "anomaly_map_sigma 2.0 (bank) vs 4.0",
        ),
        "smaller.pcjb": (with_bank(config, first, 60), "the bank holds memory_bank float32[60,"),
    }
    for name, (model, reason) in cases.items():
        export.export_bank(model, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(reason)) as error:
            exported.load(program, bank=tmp_path / name)
        message = str(error.value)
        assert str(program) in message and str(tmp_path / name) in message and "\n" not in message
    with pytest.raises(ValueError, match="takes its memory bank as an input") as error:
        exported.load(program)
    assert str(program) in str(error.value)
    with pytest.raises(ValueError, match="has its memory bank inside"):
        exported.load(exported_model[1], bank=line.folder / "a.pcjb")
    with pytest.raises(ValueError, match="not a patchcore-jax bank file"):
        exported.load(program, bank=program)
    with pytest.raises(ValueError, match="not a patchcore-jax export file"):
        exported.load(line.folder / "a.pcjb")


def test_a_damaged_or_other_version_bank_file_is_refused(line, tmp_path):
    program, bank = line.folder / "line.pcjx", line.folder / "a.pcjb"
    data = bank.read_bytes()
    flipped = bytearray(data)
    flipped[-100] ^= 0x01
    cases = {
        "flipped.pcjb": (bytes(flipped), "its bank does not match its sha256"),
        "short.pcjb": (data[:-4], "truncated"),
        "long.pcjb": (data + b"\0", "longer than its header says"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=reason) as error:
            exported.load(program, bank=tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)
    metadata, payload = exported.read_checksummed(bank, "bank", exported.BANK_FORMAT_VERSION, "")
    wrong_sizes = {**metadata, "arrays": [[*metadata["arrays"][0][:2], [31, 1024]]]}
    future = exported.BANK_FORMAT_VERSION + 1
    for name, version, fields, reason in (
        ("future.pcjb", future, metadata, f"bank format version {future};.*export the bank again"),
        ("sizes.pcjb", exported.BANK_FORMAT_VERSION, wrong_sizes, "its arrays take"),
    ):
        exported.write_checksummed(tmp_path / name, "bank", version, fields, payload, "bank")
        with pytest.raises(ValueError, match=reason):
            exported.load(program, bank=tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no bank file at"):
        exported.load(program, bank=tmp_path / "missing.pcjb")


def test_a_bank_grown_within_its_bucket_needs_only_its_bank_file_again(line, tmp_path):
    """``fit --resume`` (``extend`` of the loaded checkpoint): 65 -> 66 rows, one bucket (66);
    re-exporting the bank alone makes the old program give the grown model's scores."""
    grown = checkpoint.load(line.folder / "a")
    with pytest.warns(UserWarning, match="calibrated"):
        grown.extend(line.train[68:69])
    assert grown.memory_bank.shape[0] == 66
    checkpoint.save(grown, tmp_path / "grown")
    program, bank = line.folder / "line.pcjx", tmp_path / "grown.pcjb"
    before = program.read_bytes()
    result = run_cli("export", tmp_path / "grown", "--bank-out", bank)
    assert result.stderr.strip().endswith(f"to {bank} (bank of 66 rows)")
    assert program.read_bytes() == before
    loaded = exported.load(program, bank=bank)
    assert loaded.bank_metadata["bank_rows"] == 66
    assert_within_rounding(loaded(line.test), grown, line.test)


def test_an_ensemble_exports_its_members_and_the_loader_combines_each_batch(line, tmp_path):
    """One program holds every member (banks inside); the loader combines their outputs over
    the called batch as ``Ensemble.predict`` does (``exported.combine``): each member's raw
    outputs are its ``predict``'s to float32 rounding, and there is no calibration."""
    from patchcore_jax import Ensemble

    first, second = line.models["a"], line.models["b"]
    ensemble = Ensemble([first, second])
    program = tmp_path / "ensemble.pcjx"
    with pytest.raises(ValueError, match="--bank-out exports one model's bank"):
        export.export_model(ensemble, program, bank_path=tmp_path / "e.pcjb", platforms=["cpu"])
    assert not program.exists()
    metadata = export.export_model(ensemble, program, platforms=["cpu"])
    assert metadata["ensemble"]["members"] == 2 and metadata["calibration"] is None
    loaded = exported.load(program)
    assert loaded.members == 2
    outputs = loaded(line.test)
    assert outputs["decisions"] is None and outputs["normalized_scores"] is None
    member_maps = []
    for member, raw in zip((first, second), outputs["member_scores"], strict=True):
        prediction = member.predict(line.test)
        scores, maps = prediction.image_scores, prediction.anomaly_maps
        score_bound, _ = rounding_bounds(member, line.test, scores)
        assert np.all(np.abs(raw - scores) <= score_bound)
        member_maps.append(maps)
    combined, _ = exported.combine(list(outputs["member_scores"]), member_maps)
    np.testing.assert_array_equal(outputs["image_scores"], combined)
    assert outputs["anomaly_maps"].shape == (len(line.test), *ensemble.image_shape)
    reference_scores = ensemble.predict(line.test).image_scores
    assert np.array_equal(np.argsort(outputs["image_scores"]), np.argsort(reference_scores))
