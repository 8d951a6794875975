"""ensemble.py: the reference's combination, and an Ensemble of MobileNetV2 + a random-init
ResNet-18 against its members fitted and combined by hand."""

import numpy as np
import pytest
from conftest import BOTTLE

import patchcore_jax
from patchcore_jax import PatchCore, PatchCoreConfig, checkpoint, ensemble, sharding
from patchcore_jax.backbones import init_backbone
from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.preprocess import load_images


def _by_hand(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_combine_min_max_normalises_each_member_over_the_set_then_averages():
    scores = [np.array([1.0, 3.0, 5.0]), np.array([10.0, 30.0, 20.0])]
    maps = [np.arange(12.0).reshape(3, 2, 2), np.arange(12.0)[::-1].reshape(3, 2, 2) * 7]
    combined_scores, combined_maps = ensemble.combine(scores, maps)
    np.testing.assert_allclose(combined_scores, [0.0, 0.75, 0.75])
    np.testing.assert_allclose(combined_maps, np.full((3, 2, 2), 0.5), atol=1e-7)
    # a constant member adds zeros (no division by zero); a NaN image stays NaN alone
    constant, _ = ensemble.combine([np.ones(3), np.array([0.0, np.nan, 2.0])], maps)
    np.testing.assert_allclose(constant, [0.0, np.nan, 0.5])
    with pytest.raises(ValueError, match="different image sets"):
        ensemble.combine([np.ones(3), np.ones(4)], maps)


def test_members_must_share_the_image_frame():
    configs = [PatchCoreConfig(backbone="mobilenet_v2"), PatchCoreConfig(crop=192)]
    with pytest.raises(ValueError, match="must share crop: member 0 .* 224, member 1 .* 192"):
        ensemble.check_members(configs)


@pytest.fixture(scope="module")
def fitted():
    dataset = load_dataset(BOTTLE)
    train = load_images(dataset.train_paths[:4])
    samples = [s for s in dataset.test_samples if s.label == 0][:2]
    samples += [s for s in dataset.test_samples if s.label == 1][:2]
    test = load_images([s.image_path for s in samples])
    mesh = sharding.make_mesh()
    resnet = init_backbone("resnet18")
    configs = [
        PatchCoreConfig(backbone="mobilenet_v2", sampler="random", coreset_fraction=0.05),
        PatchCoreConfig(backbone="resnet18", sampler="random", coreset_fraction=0.05, seed=1),
    ]
    model = ensemble.Ensemble.from_configs(configs, backbones=[None, resnet], mesh=mesh)
    model.fit(iter([train[:3], train[3:]]))  # an iterator is read once for both members
    members = [
        PatchCore(configs[0], mesh=mesh).fit(train),
        PatchCore(configs[1], backbone=resnet, mesh=mesh).fit(train),
    ]
    return model, members, test, resnet, mesh


def test_every_member_spills_its_features_into_spill_dir_created_if_missing(fitted, tmp_path):
    _, members, test, resnet, mesh = fitted
    configs = [m.config.replace(feature_memory_budget=0, calibration="none") for m in members]
    backbones = [members[0].backbone, resnet]
    spilling = ensemble.Ensemble.from_configs(configs, backbones=backbones, mesh=mesh)
    spill_dir = tmp_path / "new" / "spill"
    lines = []
    spilling.fit(test[:2], log=lines.append, spill_dir=spill_dir)
    where = [line for line in lines if line.startswith("features:")]
    assert len(where) == 2, lines
    assert all(f"spilled to {spill_dir}/patchcore-features-" in line for line in where), where
    assert list(spill_dir.iterdir()) == []  # each member's spill folder is removed after use


def test_ensemble_scores_like_its_members_combined_by_hand(fitted):
    model, members, test, _, _ = fitted
    predictions = [member.predict(test) for member in members]
    expected_scores = np.mean([_by_hand(p.image_scores) for p in predictions], axis=0)
    expected_maps = np.mean([_by_hand(p.anomaly_maps) for p in predictions], axis=0)
    prediction = model.predict(test)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-6, atol=1e-7)
    assert maps.shape == (4, 224, 224)


def test_ensemble_saves_and_loads_as_one_checkpoint(fitted, tmp_path):
    model, members, test, resnet, mesh = fitted
    path = tmp_path / "model"
    checkpoint.save(members[0], path)  # replaces a single model in place, as checkpoint.save does
    assert isinstance(patchcore_jax.load(path, mesh=mesh), PatchCore)
    assert checkpoint.save(model, path) == path
    assert (path / "CURRENT").read_text().strip() == "v000002"
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000002"]
    loaded = checkpoint.load(path, backbones=[None, resnet], mesh=mesh)
    for restored, member in zip(loaded.members, model.members, strict=True):
        np.testing.assert_array_equal(np.asarray(restored.memory_bank), member.memory_bank)
        assert restored.config == member.config
    expected, actual = model.predict(test), loaded.predict(test)
    np.testing.assert_array_equal(actual.image_scores, expected.image_scores)
    np.testing.assert_array_equal(actual.anomaly_maps, expected.anomaly_maps)


def test_an_interrupted_ensemble_save_keeps_the_previous_model(fitted, tmp_path, monkeypatch):
    model, members, _, _, mesh = fitted
    path = tmp_path / "model"
    checkpoint.save(members[0], path)
    original = checkpoint.save
    calls = []

    def fail_on_second_member(member, target, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(member, target, **kwargs)

    monkeypatch.setattr(checkpoint, "save", fail_on_second_member)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "v000001"]
    assert isinstance(patchcore_jax.load(path, mesh=mesh), PatchCore)


def test_ensemble_answers_the_calls_of_patchcore(fitted):
    model, members, test, _, _ = fitted
    counted = []
    prediction = model.predict(test, progress=counted.append)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    assert sum(counted) == len(test) * len(model.members)  # images per member
    results = list(model.score(test))
    np.testing.assert_array_equal(np.concatenate([r.image_scores for r in results]), scores)
    np.testing.assert_array_equal(np.concatenate([r.anomaly_maps for r in results]), maps)
    assert model.calibration is None  # normalised per scored set: no fixed threshold
    with pytest.raises(ValueError, match="cannot be calibrated"):
        model.calibrate(test)
    described = model.describe()
    assert described.startswith("ensemble of 2") and "resnet18: precision" in described
    assert model.image_shape == members[0].image_shape == (224, 224)
    assert members[0].members == [members[0]]  # a single model is its only member


def test_load_opens_either_kind_and_refuses_a_mismatched_backbone_argument(fitted, tmp_path):
    model, members, _, resnet, mesh = fitted
    single = patchcore_jax.save(members[0], tmp_path / "single")
    both = patchcore_jax.save(model, tmp_path / "ensemble")  # save writes either kind too
    assert (both / "v000001" / checkpoint.ENSEMBLE_RECORD).is_file()
    assert isinstance(patchcore_jax.load(single, mesh=mesh), PatchCore)
    loaded = patchcore_jax.load(both, mesh=mesh, backbones=[None, resnet])
    assert isinstance(loaded, ensemble.Ensemble) and len(loaded.members) == 2
    with pytest.raises(ValueError, match="pass backbones="):
        patchcore_jax.load(both, backbone=resnet)
