"""The streaming fit (issue 9, item 2): features stay on the devices, the projection is applied
batch by batch, the full rows are kept on the device, the host or a spill file, and the result
is exactly ``fit_features(patch_features(x))``'s: bank, selected rows and calibration."""

from __future__ import annotations

import errno
import os

import jax
import numpy as np
import pytest
from conftest import BOTTLE

from patchcore_jax import PatchCore, PatchCoreConfig, bank, coreset, sharding
from patchcore_jax.preprocess import load_images

# A budget in MB that forces the spill (0: nothing resident). A budget caps the device and the
# host alike, so the host tier is forced by patching the limits (none on the device).
SPILL, HOST = 0.0, "host"


@pytest.fixture(scope="module")
def train():
    paths = sorted((BOTTLE / "train" / "good").glob("*.png"))
    return load_images(paths[:: max(1, len(paths) // 12)][:12])


@pytest.fixture(scope="module")
def reference(train):
    """The in-memory path on one device, and its backbone (probed once)."""
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.02, batch_size=5)
    model = PatchCore(config, mesh=sharding.single_device_mesh())
    features = model.patch_features(train)
    model.fit_features(features)
    rows = np.asarray(
        coreset.approximate_greedy_coreset(
            features, config.bank_rows(len(features)), key=jax.random.key(config.seed)
        )
    )
    return model, features, rows


@pytest.fixture(scope="module")
def reference_8(train, reference):
    """The in-memory path on 8 devices: its calibration scores round like the 8-device
    streaming fit's (the bank is the 1-device one)."""
    model = PatchCore(
        reference[0].config, backbone=reference[0].backbone, mesh=sharding.make_mesh(2)
    )
    return model.fit_features(model.patch_features(train))


def _same_fit(model: PatchCore, reference: PatchCore) -> None:
    np.testing.assert_array_equal(np.asarray(model.memory_bank), np.asarray(reference.memory_bank))
    np.testing.assert_array_equal(model.bank_source_images, reference.bank_source_images)
    if reference.calibration is None:
        assert model.calibration is None
        return
    for name in ("image_threshold", "pixel_threshold"):
        assert getattr(model.calibration, name) == getattr(reference.calibration, name), name
    np.testing.assert_array_equal(
        model.calibration.image_scores, reference.calibration.image_scores
    )


def test_batchwise_projection_equals_the_one_shot_projection(reference):
    """``project_rows`` per batch gives the bit-identical rows ``_greedy_init`` projects, and
    ``greedy_coreset_from_projected`` the same indices as ``approximate_greedy_coreset``."""
    model, features, rows = reference
    key = jax.random.key(model.config.seed)
    projection = coreset.projection_matrix(key, features.shape[1], 128)
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh(2)):
        batch = jax.device_put(
            features.reshape(-1, 784, features.shape[1])[:8], sharding.row_sharding(mesh)
        )
        mine = np.asarray(
            coreset.project_rows(batch, sharding.replicate(projection, mesh), mesh=mesh)
        )
        whole = coreset._rows_on_mesh(features[: 8 * 784], mesh)
        constants, _ = coreset._greedy_init(
            whole,
            sharding.replicate(projection, mesh),
            sharding.replicate(np.zeros(1, np.int32), mesh),
            method="full",
            num_valid=8 * 784,
            mesh=mesh,
        )
        expected = np.asarray(constants[0]).T[: 8 * 784]  # columns [p, n] -> rows
        np.testing.assert_array_equal(mine, expected)
        padded = np.zeros((16, 784, features.shape[1]), np.float32)
        padded[:12] = features.reshape(12, 784, -1)
        projected = coreset.project_rows(
            jax.device_put(padded, sharding.row_sharding(mesh)),
            sharding.replicate(projection, mesh),
            mesh=mesh,
        )[: 12 * 784]
        indices = coreset.greedy_coreset_from_projected(projected, len(rows), key=key, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(indices), rows)


# Every storage place and device count with the default calibration; the other calibrations
# on one device, on the device and spilled.
FIT_CASES = [
    (devices, budget, "self-excluded") for devices in (1, 8) for budget in (None, HOST, SPILL)
] + [(1, budget, calibration) for calibration in ("held-out", "none") for budget in (None, SPILL)]


@pytest.mark.parametrize("devices, budget, calibration", FIT_CASES)
def test_streaming_fit_equals_the_in_memory_fit(
    train, reference, reference_8, budget, calibration, devices, monkeypatch
):
    ref_model = reference[0] if devices == 1 else reference_8
    if budget == HOST:
        monkeypatch.setattr(bank, "memory_limits", lambda *_: (0, float("inf")))
    config = ref_model.config.replace(
        feature_memory_budget=None if budget == HOST else budget, calibration=calibration
    )
    if calibration != "self-excluded":
        ref_model = PatchCore(config, backbone=ref_model.backbone, mesh=ref_model.mesh)
        ref_model.fit_features(ref_model.patch_features(train))
    mesh = sharding.single_device_mesh() if devices == 1 else sharding.make_mesh(2)
    lines = []
    model = PatchCore(config, backbone=ref_model.backbone, mesh=mesh)
    model.fit(train, log=lines.append)
    _same_fit(model, ref_model)
    if calibration != "held-out":  # held-out images stay out of the bank
        memory_bank = np.asarray(reference[0].memory_bank)  # every device count: 1 device's
        np.testing.assert_array_equal(np.asarray(model.memory_bank), memory_bank)
    kept = next(line for line in lines if line.startswith("features:"))
    expected = {None: "on the device", HOST: "in host memory", SPILL: "spilled to"}[budget]
    assert expected in kept, kept


def test_random_sampler_and_uneven_batches(train, reference):
    config = reference[0].config.replace(sampler="random", feature_memory_budget=SPILL)
    old = PatchCore(config, backbone=reference[0].backbone, mesh=sharding.make_mesh(1))
    old.fit_features(old.patch_features(train))
    model = PatchCore(config, backbone=reference[0].backbone, mesh=sharding.make_mesh(1))
    model.fit(iter([train[:7], train[7:]]))  # batches of 7 and 5 (of 8)
    _same_fit(model, old)


def test_spill_file_is_removed_after_success_and_after_an_error(train, reference, tmp_path):
    config = reference[0].config.replace(feature_memory_budget=SPILL)
    model = PatchCore(config, backbone=reference[0].backbone, mesh=sharding.single_device_mesh())
    seen = []

    def watch(line):
        if line.startswith("features:"):
            seen.extend(tmp_path.iterdir())
            assert "spilled to " + str(tmp_path) in line, line

    model.fit(train[:4], log=watch, spill_dir=tmp_path)
    assert len(seen) == 1 and not any(tmp_path.iterdir())

    def fail(count):
        assert any(tmp_path.iterdir())  # the spill folder exists while embedding
        if count:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.fit(train[:8], progress=fail, spill_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_full_disk_while_spilling_is_an_error_naming_the_spill_file(tmp_path, monkeypatch):
    """A write that fails (here: /dev/full, a real ENOSPC) is never lost or reported without
    the file's name; ndarray.tofile dropped small failed writes silently."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    made, mkdtemp = tmp_path / "spill", bank.tempfile.mkdtemp

    def full_folder(prefix, dir):
        if prefix != "patchcore-features-":  # the writability probe
            return mkdtemp(prefix=prefix, dir=dir)
        made.mkdir()
        (made / f"features_{jax.process_index()}.f32").symlink_to("/dev/full")
        return str(made)

    monkeypatch.setattr(bank.tempfile, "mkdtemp", full_folder)
    store = bank.FeatureStore(device_limit=0, host_limit=0, spill_dir=tmp_path)
    with store, pytest.raises(OSError) as raised:
        store.add_rows(np.ones((2, 4, 8), np.float32))
        store.finish()
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write {made / 'features_0.f32'}: No space left on device" in str(raised.value)
    assert not made.exists()  # the spill folder is removed on the error


def test_memory_budget_picks_the_tier():
    mesh = sharding.single_device_mesh()
    assert bank.memory_limits(0, mesh) == (0, 0)
    device, host = bank.memory_limits(10, mesh)
    assert host == 10 * 2**20 and device <= host
    device, host = bank.memory_limits(None, mesh)
    assert 0 < device <= host
    with pytest.raises(ValueError, match="feature_memory_budget"):
        PatchCoreConfig(feature_memory_budget=-1)


def test_non_finite_features_are_refused_by_the_streaming_fit(train, reference, monkeypatch):
    config = reference[0].config.replace(feature_memory_budget=SPILL)
    model = PatchCore(config, backbone=reference[0].backbone, mesh=sharding.make_mesh(1))
    embed = model._embed

    def poisoned(variables, images):
        return embed(variables, images).at[1, 5, 0].set(np.nan)

    monkeypatch.setattr(model, "_embed", poisoned)
    with pytest.raises(ValueError, match=r"patch features: 2 of 9408 rows are non-finite"):
        model.fit(train)  # 2 batches of 8, each with a NaN in its second image
    assert model.memory_bank is None
