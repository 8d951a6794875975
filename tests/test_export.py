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

import numpy as np
import pytest
from conftest import BOTTLE
from test_cli import run_cli

from patchcore_jax import PatchCore, PatchCoreConfig, checkpoint, export, exported
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
    scores, maps = model.predict(images)
    calibration = model.calibration
    np.testing.assert_allclose(outputs["image_scores"], scores, rtol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_maps"], maps, rtol=1e-5, atol=1e-5 * maps.max())
    np.testing.assert_allclose(
        outputs["normalized_scores"], calibration.normalize_image_scores(scores), atol=1e-6
    )
    np.testing.assert_array_equal(outputs["decisions"], scores >= calibration.image_threshold)
    assert 0 < outputs["decisions"].sum() < len(images)  # good and defective images in the set


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
