"""orbax checkpoints: exact round trip, refusal of mismatched or damaged ones, safe overwrite."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import BOTTLE

from patchcore_jax import CheckpointError, PatchCore, PatchCoreConfig, checkpoint, sharding
from patchcore_jax.data import load_dataset
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
    path = fitted.save(tmp_path / "model")
    restored = PatchCore.load(path, mesh=sharding.single_device_mesh())
    assert restored.config == fitted.config
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(fitted.memory_bank))
    scores, maps = fitted.predict(images[1])
    scores_restored, maps_restored = restored.predict(images[1])
    np.testing.assert_array_equal(scores_restored, scores)
    np.testing.assert_array_equal(maps_restored, maps)
    record = checkpoint.read_record(path)
    assert record["backbone"]["weights_sha256"] == fitted.backbone.weights_sha256
    assert record["memory_bank"]["shape"] == list(fitted.memory_bank.shape)


def test_changed_backbone_weights_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    other = dataclasses.replace(fitted.backbone, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="weights sha256"):
        checkpoint.load(path, backbone=other)


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_truncated_bank_file_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    victim = _largest_file(path / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)


def test_flipped_bank_bytes_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    victim = _largest_file(path / "state")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)


def test_different_embedding_dimension_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    with pytest.raises(CheckpointError, match="target_embed_dimension"):
        checkpoint.load(path, expected_config=fitted.config.replace(target_embed_dimension=1024))
    # A record whose config disagrees with the stored bank's shape is refused too.
    record = checkpoint.read_record(path)
    record["config"]["target_embed_dimension"] = 1024
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        tmp_path / "tampered",
        ocp.args.Composite(
            state=ocp.args.StandardSave({"memory_bank": np.asarray(fitted.memory_bank)}),
            record=ocp.args.JsonSave(record),
        ),
    )
    with pytest.raises(CheckpointError, match="target_embed_dimension"):
        checkpoint.load(tmp_path / "tampered")


def test_missing_or_partial_checkpoints_are_reported(fitted, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing")
    path = fitted.save(tmp_path / "model")
    for item in (path / "record").iterdir():
        item.unlink()
    with pytest.raises(CheckpointError, match="not a complete"):
        checkpoint.load(path)


def test_crash_while_saving_keeps_the_previous_model(fitted, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "model")
    before = json.dumps(checkpoint.read_record(path), sort_keys=True)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    monkeypatch.undo()
    assert json.dumps(checkpoint.read_record(path), sort_keys=True) == before
    restored = checkpoint.load(path)
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(fitted.memory_bank))


def test_unfitted_models_and_foreign_folders_are_not_saved(fitted, tmp_path):
    unfitted = PatchCore(fitted.config, backbone=fitted.backbone)
    with pytest.raises(CheckpointError, match="unfitted"):
        unfitted.save(tmp_path / "model")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a patchcore-jax checkpoint"):
        fitted.save(foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_checkpoint_whose_bank_is_smaller_than_k_or_b_is_refused_on_load(fitted, tmp_path):
    rows = fitted.memory_bank.shape[0]
    record = checkpoint.read_record(fitted.save(tmp_path / "model"))
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
                record=ocp.args.JsonSave(record),
            ),
        )
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path)
