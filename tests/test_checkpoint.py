"""orbax checkpoints: exact round trip, refusal of mismatched or damaged ones, safe overwrite."""

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import BOTTLE

from patchcore_jax import (
    CheckpointError,
    PatchCore,
    PatchCoreConfig,
    checkpoint,
    checkpoint_folder,
    sharding,
)
from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.preprocess import load_images


@pytest.fixture(scope="module")
def images():
    dataset = load_dataset(BOTTLE)
    return load_images(dataset.train_paths[:6]), load_images(
        [s.image_path for s in dataset.test_samples[::20]]
    )


@pytest.fixture(scope="module")
def fitted(images):
    config = PatchCoreConfig(
        backbone="mobilenet_v2", coreset_fraction=0.05, target_embed_dimension=512
    )
    return PatchCore(config, mesh=sharding.single_device_mesh()).fit(images[0])


def test_round_trip_gives_identical_scores_and_maps(fitted, images, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    restored = checkpoint.load(path, mesh=sharding.single_device_mesh())
    assert restored.config == fitted.config
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(fitted.memory_bank))
    prediction = fitted.predict(images[1])
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    prediction = restored.predict(images[1])
    scores_restored, maps_restored = prediction.image_scores, prediction.anomaly_maps
    np.testing.assert_array_equal(scores_restored, scores)
    np.testing.assert_array_equal(maps_restored, maps)
    record = checkpoint.read_record(path)
    assert record["backbone"]["weights_sha256"] == fitted.backbone.weights_sha256
    assert record["memory_bank"]["shape"] == list(fitted.memory_bank.shape)


def test_changed_backbone_weights_are_refused(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    other = dataclasses.replace(fitted.backbone, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="weights sha256"):
        checkpoint.load(path, backbone=other)


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_bank_file_is_refused(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    victim = _largest_file(path / "v000001" / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)


def test_flipped_bank_bytes_are_refused(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    victim = _largest_file(path / "v000001" / "state")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)


def test_different_embedding_dimension_is_refused(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    with pytest.raises(CheckpointError, match="target_embed_dimension"):
        checkpoint.load(path, expected_config=fitted.config.replace(target_embed_dimension=1024))
    # A record whose config disagrees with the stored bank's shape is refused too.
    record = checkpoint.read_record(path)
    record["config"]["target_embed_dimension"] = 1024
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        tmp_path / "tampered",
        ocp.args.Composite(
            state=ocp.args.StandardSave({"memory_bank": np.asarray(fitted.memory_bank)}),
            record=ocp.args.JsonSave(checkpoint._signed(record)),  # consistent, yet wrong
        ),
    )
    with pytest.raises(CheckpointError, match="target_embed_dimension"):
        checkpoint.load(tmp_path / "tampered")


def test_missing_or_partial_checkpoints_are_reported(fitted, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing")
    path = checkpoint.save(fitted, tmp_path / "model")
    for item in (path / "v000001" / "record").iterdir():
        item.unlink()
    with pytest.raises(CheckpointError, match="not a complete"):
        checkpoint.load(path)


def test_crash_while_saving_keeps_the_previous_model(fitted, tmp_path, monkeypatch):
    path = checkpoint.save(fitted, tmp_path / "model")
    before = json.dumps(checkpoint.read_record(path), sort_keys=True)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint {path}: OSError: disk"):
        checkpoint.save(fitted, path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000001"]  # no staging left
    monkeypatch.undo()
    assert json.dumps(checkpoint.read_record(path), sort_keys=True) == before
    restored = checkpoint.load(path)
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(fitted.memory_bank))


def test_unfitted_models_and_foreign_folders_are_not_saved(fitted, tmp_path):
    unfitted = PatchCore(fitted.config, backbone=fitted.backbone)
    with pytest.raises(CheckpointError, match="unfitted"):
        checkpoint.save(unfitted, tmp_path / "model")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a patchcore-jax checkpoint"):
        checkpoint.save(fitted, foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_checkpoint_whose_bank_is_smaller_than_k_or_b_is_refused_on_load(fitted, tmp_path):
    rows = fitted.memory_bank.shape[0]
    record = checkpoint.read_record(checkpoint.save(fitted, tmp_path / "model"))
    for changes, message in [
        ({"num_neighbors": rows + 1}, rf"num_neighbors \(k, --k\) = {rows + 1} exceeds"),
        ({"reweight": True, "reweight_neighbors": rows + 1}, r"\(b, --reweight-neighbors\)"),
    ]:
        record["config"] = {**fitted.config.to_dict(), **changes}
        path = tmp_path / f"tampered_{len(changes)}"
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
            path,
            ocp.args.Composite(
                state=ocp.args.StandardSave({"memory_bank": np.asarray(fitted.memory_bank)}),
                record=ocp.args.JsonSave(checkpoint._signed(record)),  # consistent, yet wrong
            ),
        )
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path)


# ----------------------------------------------------------------------------------------------
# Atomic replacement under kill -9 (issue 13, item 7)

_TINY_CHILD = """
import os, signal, sys
import numpy as np
from patchcore_jax import checkpoint, checkpoint_folder, sharding
sys.path.insert(0, {tests!r})
from test_checkpoint import tiny_model

path, point, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = tiny_model(seed)
np.save(path + ".new_bank.npy", np.asarray(model.memory_bank))

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint_folder.reached = lambda name: kill() if name == point else None
rename = os.rename

def renaming(source, destination, *args, **kwargs):  # orbax finalises with os.rename
    if point == "orbax:state" and str(destination).endswith("/state"):
        kill()
    if point == "orbax:commit" and str(destination).endswith(".saving"):
        kill()
    return rename(source, destination, *args, **kwargs)

os.rename = renaming
checkpoint.save(model, path)
print("saved without being killed")
"""


def tiny_model(seed: int) -> PatchCore:
    """resnet18 with random weights on 32-pixel random images: a 32-row bank in a second."""
    from patchcore_jax.backbones import init_backbone

    config = PatchCoreConfig(
        backbone="resnet18",
        resize=32,
        crop=32,
        pretrain_embed_dimension=16,
        target_embed_dimension=8,
        sampler="identity",
    )
    mesh = sharding.single_device_mesh()
    with warnings.catch_warnings():  # deliberately tiny: the 2x2 layer3 grid warning is known
        warnings.simplefilter("ignore")
        model = PatchCore(config, backbone=init_backbone("resnet18"), mesh=mesh)
    images = np.random.default_rng(seed).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    return model.fit(images)


def _legacy_save(model: PatchCore, path: Path) -> None:
    """A checkpoint as versions before the CURRENT pointer wrote it (orbax at ``path``)."""
    checkpoint.save(model, path)
    version = path / checkpoint_folder.current_version(path)
    (path / "CURRENT").unlink()
    for item in version.iterdir():
        item.rename(path / item.name)
    version.rmdir()


@pytest.mark.parametrize(
    "point, survivor, legacy",
    [
        ("writing", "old", False),
        ("orbax:state", "old", False),
        ("orbax:commit", "old", False),
        ("written", "old", False),
        ("renamed", "old", False),
        ("switched", "new", False),
        ("cleaned", "new", False),
        ("renamed", "old", True),
        ("switched", "new", True),
    ],
)
def test_kill_during_save_leaves_the_old_or_the_new_model_loadable(
    point, survivor, legacy, tmp_path
):
    import os
    import subprocess
    import sys

    path = tmp_path / "model"
    old = tiny_model(seed=0)
    (_legacy_save if legacy else checkpoint.save)(old, path)
    (path / "notes.txt").write_text("mine")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = _TINY_CHILD.format(tests=str(Path(__file__).parent))
    result = subprocess.run(
        [sys.executable, "-c", child, str(path), point, "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == -9, result.stdout + result.stderr  # killed by SIGKILL
    new_bank = np.load(f"{path}.new_bank.npy")
    expected = np.asarray(old.memory_bank) if survivor == "old" else new_bank
    assert not np.array_equal(new_bank, np.asarray(old.memory_bank))
    restored = checkpoint.load(path, backbone=old.backbone, mesh=sharding.single_device_mesh())
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), expected)
    # The next save removes what the killed one left, and nothing else.
    checkpoint.save(old, path)
    assert sorted(p.name for p in path.iterdir()) == [
        "CURRENT",
        "notes.txt",
        _next(survivor, legacy),
    ]
    assert (path / "notes.txt").read_text() == "mine"
    restored = checkpoint.load(path, backbone=old.backbone, mesh=sharding.single_device_mesh())
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(old.memory_bank))


def _next(survivor: str, legacy: bool) -> str:
    """The version the save after the kill writes: one past the surviving model's."""
    surviving = (0 if legacy else 1) + (survivor == "new")
    return f"v{surviving + 1:06d}"


_FULL_DISK_CHILD = """
import resource, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import tiny_model
from patchcore_jax import CheckpointError, checkpoint
model = tiny_model(0)
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # writes past 200 bytes fail (EFBIG)
try:
    checkpoint.save(model, sys.argv[1])
except CheckpointError as error:
    print(error)
"""


def test_a_full_disk_is_reported_in_one_line_naming_the_path(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = _FULL_DISK_CHILD.format(tests=str(Path(__file__).parent))
    path = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cannot write the checkpoint {path}: ")
    # The folder it created is gone again, unless an orbax writer thread that outlived the
    # error recreated its staging folder; then the next save removes that.
    assert not path.exists() or all(p.name.startswith(".v000001.saving") for p in path.iterdir())
    model = tiny_model(0)
    checkpoint.save(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000001"]


def test_damaged_bank_metadata_gives_one_clean_line(fitted, tmp_path, capfd):
    path = checkpoint.save(fitted, tmp_path / "model")
    victim = path / "v000001" / "state" / "array_metadatas" / "process_0"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged or partial") as caught:
        checkpoint.load(path, backbone=fitted.backbone)
    assert "\n" not in str(caught.value) and "<bound method" not in str(caught.value)
    assert "Traceback" not in capfd.readouterr().err


def test_tensorstore_spec_dumps_are_cut_from_messages():
    error = Exception(
        "Encountered error while reading array index: (slice(0, 32, 1),). See full "
        "TensorStore details: <bound method spec of TensorStore({\n  'base': {})>."
    )
    assert checkpoint._first_line(error) == (
        "Exception: Encountered error while reading array index: (slice(0, 32, 1),)."
    )


def test_a_pointer_to_a_missing_version_is_reported(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    (path / "CURRENT").write_text("v000007\n")
    with pytest.raises(CheckpointError, match="CURRENT names v000007, which does not exist"):
        checkpoint.load(path)


# ----------------------------------------------------------------------------------------------
# Destination checks (issue 13, item 6)


def test_check_destination_refuses_files_foreign_folders_and_unwritable_places(
    fitted, tmp_path, monkeypatch
):
    import os

    (tmp_path / "x.jpg").write_bytes(b"image")
    with pytest.raises(CheckpointError, match=r"x.jpg is a file, not a checkpoint folder"):
        checkpoint_folder.check_destination(tmp_path / "x.jpg")
    with pytest.raises(CheckpointError, match=r"cannot create .*/x.jpg/model: .*x.jpg is a file"):
        checkpoint_folder.check_destination(tmp_path / "x.jpg" / "model")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"png")
    with pytest.raises(CheckpointError, match="photos exists and is not a patchcore-jax"):
        checkpoint_folder.check_destination(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    assert checkpoint_folder.check_destination(tmp_path / "empty") == tmp_path / "empty"
    deeper = tmp_path / "new" / "deeper"
    assert checkpoint_folder.check_destination(deeper) == deeper
    assert not (tmp_path / "new").exists()  # checking creates nothing
    saved = checkpoint.save(fitted, tmp_path / "model")
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        checkpoint_folder.check_destination(saved, overwrite=False)
    # A folder the OS refuses to write in (as a read-only file system would, even for root).
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path).parent == read_only:
            raise OSError(30, "Read-only file system", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(CheckpointError, match=r"read_only is not writable \(Read-only file"):
        checkpoint_folder.check_destination(read_only / "model")
    with pytest.raises(CheckpointError, match=r"read_only is not writable"):
        checkpoint.save(fitted, read_only / "model")
    assert list(read_only.iterdir()) == []


def test_saving_over_a_checkpoint_keeps_files_the_tool_did_not_write(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    (path / "notes.txt").write_text("mine")
    (path / "plots").mkdir()
    (path / "plots" / "roc.png").write_bytes(b"png")
    checkpoint.save(fitted, path)
    checkpoint.save(fitted, path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "notes.txt", "plots", "v000003"]
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "plots" / "roc.png").read_bytes() == b"png"


def test_checkpoints_reproduce_the_probed_batch_norm_statistics(images, tmp_path):
    """The probe is recorded through the config: loading probes the pristine weights again."""
    from patchcore_jax.backbones import init_backbone, probe_batch_norm

    train = images[0][:2]
    mesh = sharding.single_device_mesh()
    config = PatchCoreConfig(backbone="resnet18", sampler="identity", target_embed_dimension=64)
    model = PatchCore(config, backbone=init_backbone("resnet18"), mesh=mesh).fit(train)
    expected = probe_batch_norm(init_backbone("resnet18"), (224, 224)).variables
    jax_leaves = jax.tree.leaves
    for ours, theirs in zip(
        jax_leaves(model.backbone.variables), jax_leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    path = checkpoint.save(model, tmp_path / "model")
    record = checkpoint.read_record(path)
    assert record["config"]["batch_norm_probe"] is True
    assert record["backbone"]["batch_norm_probe"] is True
    assert record["preprocessing"] == {
        "resize_mode": "shorter-side",
        "resize": 256,
        "image_shape": [224, 224],
    }
    restored = checkpoint.load(path, backbone=init_backbone("resnet18"), mesh=mesh)
    for ours, theirs in zip(
        jax_leaves(restored.backbone.variables), jax_leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(
        restored.predict(train).image_scores, model.predict(train).image_scores
    )

    # Switched off: pristine statistics, and different scores.
    pristine = PatchCore(
        config.replace(batch_norm_probe=False), backbone=init_backbone("resnet18"), mesh=mesh
    ).fit(train)
    for ours, theirs in zip(
        jax_leaves(pristine.backbone.variables),
        jax_leaves(init_backbone("resnet18").variables),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.allclose(
        pristine.predict(train[:1]).anomaly_maps, model.predict(train[:1]).anomaly_maps
    )


def test_checkpoints_from_before_the_probe_load_with_pristine_statistics(fitted, tmp_path):
    path = checkpoint.save(fitted, tmp_path / "model")
    (record_path,) = path.rglob("record/metadata")
    record = json.loads(record_path.read_text())
    del record["config"]["batch_norm_probe"], record["record_sha256"]  # as written before both
    record_path.write_text(json.dumps(record))
    assert checkpoint.load(path).config.batch_norm_probe is False


def test_precision_is_kept_and_checkpoints_without_it_load_exact(fitted, tmp_path):
    fast = PatchCore(
        fitted.config.replace(precision="fast", calibration="none"),
        backbone=fitted.backbone,
        mesh=sharding.single_device_mesh(),
        memory_bank=fitted.memory_bank,
    )
    assert checkpoint.load(checkpoint.save(fast, tmp_path / "fast")).config.precision == "fast"
    path = checkpoint.save(fitted, tmp_path / "old")
    (record_path,) = path.rglob("record/metadata")
    record = json.loads(record_path.read_text())
    del record["config"]["precision"], record["record_sha256"]  # as written before both existed
    record_path.write_text(json.dumps(record))
    assert checkpoint.load(path).config.precision == "exact"


def test_write_version_is_the_versioned_folder_protocol_of_every_save(tmp_path):
    path = tmp_path / "folder"

    def write(staging):
        staging.mkdir()
        (staging / "payload.txt").write_text("one")

    assert checkpoint_folder.write_version(path, write) == path
    assert (path / "CURRENT").read_text().strip() == "v000001"

    def fail(staging):
        staging.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint_folder.write_version(path, fail)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000001"]  # no staging left
    assert (path / "v000001" / "payload.txt").read_text() == "one"


# ----------------------------------------------------------------------------------------------
# Checksummed records, damaged pointers, concurrent writers (issue 19, items 3, 8 and 12)


def _record_file(path: Path) -> Path:
    return path / checkpoint_folder.current_version(path) / "record" / "metadata"


@pytest.mark.parametrize(
    "section, key, value",
    [("config", "num_neighbors", 2), ("calibration", "image_threshold", 1.0)],
)
def test_an_edited_record_is_refused_naming_its_file(fitted, tmp_path, section, key, value):
    path = checkpoint.save(fitted, tmp_path / "model")
    record_file = _record_file(path)
    original = json.loads(record_file.read_text())
    edited = json.loads(record_file.read_text())
    assert edited[section][key] != value
    edited[section][key] = value  # a change that would alter scores or decisions silently
    record_file.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert str(error.value).startswith(f"{record_file} does not match its recorded sha256")
    assert len(str(error.value).splitlines()) == 1
    # A record written before the checksum existed (none recorded) loads as before.
    del original["record_sha256"]
    record_file.write_text(json.dumps(original))
    restored = checkpoint.load(path)
    assert restored.config == fitted.config
    assert restored.calibration.to_dict() == fitted.calibration.to_dict()


def test_an_edited_ensemble_record_is_refused_naming_its_file(tmp_path):
    from patchcore_jax import Ensemble

    members = [tiny_model(0)] * 2
    path = checkpoint.save(Ensemble(members), tmp_path / "ensemble")
    with pytest.raises(CheckpointError, match="holds an ensemble: each member folder has"):
        checkpoint.read_record(path)  # not "incomplete"
    record_file = path / checkpoint_folder.current_version(path) / checkpoint.ENSEMBLE_RECORD
    record = json.loads(record_file.read_text())
    record["members"] = record["members"][:1]  # would silently drop a member
    record_file.write_text(json.dumps(record))
    backbones = [m.backbone for m in members]
    with pytest.raises(CheckpointError, match=f"{record_file} does not match its recorded sha256"):
        checkpoint.load(path, backbones=backbones[:1])
    del record["record_sha256"]  # as written before the checksum existed
    record_file.write_text(json.dumps(record))
    assert len(checkpoint.load(path, backbones=backbones[:1]).members) == 1


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81garbage\x00", b"", b"\n", b"v12\n"])
def test_a_damaged_current_pointer_is_one_line_naming_it(fitted, tmp_path, content):
    path = checkpoint.save(fitted, tmp_path / "model")
    (path / "CURRENT").write_bytes(content)
    for call in (lambda: checkpoint.load(path), lambda: checkpoint_folder.check_destination(path)):
        with pytest.raises(CheckpointError) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"{path / 'CURRENT'} is damaged: expected the name of a version")
        assert len(message.splitlines()) == 1


def test_concurrent_saves_leave_a_loadable_model_and_the_second_writer_fails(tmp_path, monkeypatch):
    import threading

    first, second = tiny_model(0), tiny_model(1)
    path = tmp_path / "model"
    written, resume = threading.Event(), threading.Event()

    def pause_the_first(point: str) -> None:
        if point == "written" and threading.current_thread().name == "first":
            written.set()  # the first save has written its version, not yet switched to it
            resume.wait(timeout=120)

    monkeypatch.setattr(checkpoint_folder, "reached", pause_the_first)
    errors = []

    def save_first() -> None:
        try:
            checkpoint.save(first, path)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=save_first, name="first")
    thread.start()
    try:
        assert written.wait(timeout=120)
        for call in (
            lambda: checkpoint.save(second, path),
            lambda: checkpoint_folder.check_destination(path),
        ):
            with pytest.raises(CheckpointError, match="in use by another patchcore-jax run"):
                call()
    finally:
        resume.set()
        thread.join()
    assert errors == []
    restored = checkpoint.load(path, backbone=first.backbone, mesh=sharding.single_device_mesh())
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(first.memory_bank))
    checkpoint.save(second, path)  # the lock went with the first save
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000002"]


def test_a_save_never_deletes_a_version_newer_than_its_own(tmp_path, monkeypatch):
    path = tmp_path / "folder"
    checkpoint_folder.write_version(path, lambda staging: staging.mkdir())

    def another_writer(point: str) -> None:  # one that does not lock (an older version)
        if point == "switched":
            (path / "v000009").mkdir()
            (path / "v000009" / "payload.txt").write_text("theirs")

    monkeypatch.setattr(checkpoint_folder, "reached", another_writer)
    checkpoint_folder.write_version(path, lambda staging: staging.mkdir())
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000002", "v000009"]
    assert (path / "v000009" / "payload.txt").read_text() == "theirs"


def test_probed_statistics_are_saved_and_restored_not_probed_again(tmp_path, monkeypatch):
    from patchcore_jax import backbones

    model = tiny_model(0)  # resnet18: BatchNorm statistics, probed at 32 x 32
    probed = model.backbone.variables["batch_stats"]
    path = checkpoint.save(model, tmp_path / "model")
    assert checkpoint.read_record(path)["backbone"]["probed_statistics"]["image_shape"] == [32, 32]
    images = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    expected = model.predict(images)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init weights, tiny grid
        patch.setattr(backbones, "probe_batch_norm", lambda *args: pytest.fail("probed again"))
        restored = checkpoint.load(path, mesh=sharding.single_device_mesh())
    assert restored.backbone.probed_image_shape == (32, 32)
    jax.tree.map(np.testing.assert_array_equal, restored.backbone.variables["batch_stats"], probed)
    prediction = restored.predict(images)
    np.testing.assert_array_equal(prediction.image_scores, expected.image_scores)
    np.testing.assert_array_equal(prediction.anomaly_maps, expected.anomaly_maps)
    stored = backbones.probed_statistics(model.backbone)
    pristine = backbones.init_backbone("resnet18")
    with pytest.raises(ValueError, match="do not fit backbone resnet18"):
        backbones.restore_probe(pristine, (32, 32), stored[:-1])
    with pytest.raises(ValueError, match="already probed"):
        backbones.restore_probe(model.backbone, (32, 32), stored)

    # A checkpoint without them (written before they were saved) is probed at load, as before.
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "probed_statistics", lambda backbone: None)
        older = checkpoint.save(model, tmp_path / "older")
    assert checkpoint.read_record(older)["backbone"]["probed_statistics"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reprobed = checkpoint.load(older, mesh=sharding.single_device_mesh())
    jax.tree.map(np.testing.assert_array_equal, reprobed.backbone.variables["batch_stats"], probed)
