"""Export round trip: `patchcore-jax export`, then `exported.load` in a process without flax or
orbax, equal to `predict` for two batch sizes from one file; bad files give one clear error."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BOTTLE
from test_cli import run_cli

from patchcore_jax import PatchCore, PatchCoreConfig, checkpoint, exported
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
    start = len(exported.MAGIC) + 8
    length = int.from_bytes(data[len(exported.MAGIC) : start], "little")
    header = json.loads(data[start : start + length])
    header["format_version"] = exported.FORMAT_VERSION + 1
    new_header = json.dumps(header).encode()
    (tmp_path / "future.pcjx").write_bytes(
        exported.MAGIC + len(new_header).to_bytes(8, "little") + new_header + data[start + length :]
    )
    with pytest.raises(ValueError, match=f"format version {exported.FORMAT_VERSION + 1}"):
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
