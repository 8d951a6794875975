"""PatchCoreConfig: reference defaults, validation, and a lossless dict round trip."""

import pytest

from patchcore_jax.config import PatchCoreConfig, member_configs, preset_values


def test_defaults_are_the_reference_settings():
    config = PatchCoreConfig()
    assert config.backbone == "wide_resnet50_2"
    assert (config.resize, config.crop, config.patch_size) == (256, 224, 3)
    assert (config.pretrain_embed_dimension, config.target_embed_dimension) == (1024, 1024)
    assert (config.sampler, config.coreset_fraction) == ("approx_greedy_coreset", 0.1)
    assert (config.projection_dim, config.num_start_points) == (128, 10)
    assert (config.num_neighbors, config.distance, config.reweight) == (1, "squared_l2", False)
    assert config.anomaly_map_sigma == 4.0
    assert config.precision == "exact"


def test_dict_round_trip_is_lossless():
    config = PatchCoreConfig(backbone="mobilenet_v2", layers=["stride8", "stride16"], seed=3)
    assert config.layers == ("stride8", "stride16")
    assert PatchCoreConfig.from_dict(config.to_dict()) == config
    assert config.replace(seed=4).seed == 4
    fast = config.replace(precision="fast")
    assert PatchCoreConfig.from_dict(fast.to_dict()) == fast


def test_patch_stride_defaults_to_one_round_trips_and_older_records_load_with_one():
    assert PatchCoreConfig().patch_stride == 1
    strided = PatchCoreConfig(patch_stride=3)
    assert PatchCoreConfig.from_dict(strided.to_dict()) == strided
    older = {k: v for k, v in strided.to_dict().items() if k != "patch_stride"}
    assert PatchCoreConfig.from_dict(older).patch_stride == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"coreset_fraction": 0.0}, "coreset_fraction"),
        ({"coreset_fraction": 1.5}, "coreset_fraction"),
        ({"sampler": "kmeans"}, "sampler"),
        ({"distance": "cosine"}, "distance"),
        ({"patch_size": 4}, "patch_size"),
        ({"patch_stride": 0}, "patch_stride must be a positive integer, got 0"),
        ({"patch_stride": 1.5}, "patch_stride must be a positive integer, got 1.5"),
        ({"crop": 300}, "crop"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_neighbors": True}, "num_neighbors"),
        ({"layers": ()}, "layers"),
        ({"reweight_neighbors": 1}, r"reweight_neighbors \(b of Eq. 7\) must be an integer >= 2"),
        ({"reweight_neighbors": 2.0}, r"reweight_neighbors \(b of Eq. 7\) must be an integer >= 2"),
        (
            {"precision": "bfloat16"},
            r"PatchCoreConfig.precision must be one of \('exact', 'fast'\)",
        ),
    ],
)
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreConfig(**changes)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown PatchCoreConfig fields"):
        PatchCoreConfig.from_dict({**PatchCoreConfig().to_dict(), "extra": 1})


def test_bank_size_must_serve_k_and_b_when_reweighting():
    PatchCoreConfig(num_neighbors=3).check_bank_size(3)
    PatchCoreConfig(reweight_neighbors=9).check_bank_size(5)  # b unused without reweighting
    with pytest.raises(ValueError, match=r"num_neighbors \(k, --k\) = 5 exceeds .* 1 rows"):
        PatchCoreConfig(num_neighbors=5).check_bank_size(1)
    with pytest.raises(ValueError, match=r"\(b, --reweight-neighbors\) = 9 exceeds .* 5 rows"):
        PatchCoreConfig(reweight=True, reweight_neighbors=9).check_bank_size(5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seed": 2**63}, r"seed must be an integer in \[0, 2\*\*32\), got 9223372036854775808"),
        ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\)"),  # would repeat seed 0
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*32\), got 1.5"),
        ({"seed": True}, r"seed must be an integer"),
        ({"anomaly_map_sigma": float("inf")}, r"anomaly_map_sigma must be a finite number >= 0"),
        ({"anomaly_map_sigma": float("nan")}, r"anomaly_map_sigma must be a finite number >= 0"),
        ({"anomaly_map_sigma": -1.0}, r"anomaly_map_sigma must be a finite number >= 0"),
        ({"layers": "stride8"}, r"layers must be a sequence of stage names, e.g. \('stride8',\)"),
        ({"layers": ("layer2", "logits")}, r"'logits' has no spatial grid"),
        ({"layers": ("layer2", 3)}, r"layers: 3 is not a stage name"),
    ],
)
def test_values_that_would_fail_after_feature_extraction_are_refused_up_front(changes, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreConfig(**changes)


def test_largest_seed_and_sigma_zero_are_accepted():
    config = PatchCoreConfig(seed=2**32 - 1, anomaly_map_sigma=0)
    assert (config.seed, config.anomaly_map_sigma) == (2**32 - 1, 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resize_mode": "squash"}, "resize_mode"),
        ({"crop": (224,)}, "crop"),
        ({"crop": (0, 10)}, "crop"),
        ({"crop": (300, 100)}, r"crop \(\(300, 100\)\) must not exceed resize"),
        ({"batch_norm_probe": "yes"}, "batch_norm_probe"),
        ({"mask_threshold": 0}, "mask_threshold"),
        ({"mask_threshold": 256}, "mask_threshold"),
    ],
)
def test_geometry_probe_and_mask_fields_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        PatchCoreConfig(**changes)


def test_image_shape_is_height_width_and_stretch_ignores_resize():
    assert PatchCoreConfig().image_shape == (224, 224)
    assert PatchCoreConfig().batch_norm_probe is True  # the reference's behaviour
    config = PatchCoreConfig(resize_mode="stretch", crop=(96, 512))
    assert config.image_shape == (96, 512)
    assert PatchCoreConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["crop"] == [96, 512]


def test_presets_hold_the_papers_settings_and_combine_in_order():
    from patchcore_jax.config import PRESETS, member_configs, preset_values

    assert preset_values("im320") == {"resize": 366, "crop": 320}
    assert preset_values("layers123")["layers"] == ("layer1", "layer2", "layer3")
    assert preset_values("im320,wrn101,coreset-1") == {
        "resize": 366,
        "crop": 320,
        "backbone": "wide_resnet101_2",
        "coreset_fraction": 0.01,
    }
    assert preset_values(["coreset-25", "coreset-1"])["coreset_fraction"] == 0.01
    for values in PRESETS.values():  # every preset makes valid configs (one per member)
        assert member_configs(values)
    with pytest.raises(ValueError, match="unknown preset 'im999'; known presets: im320"):
        preset_values("im999")


@pytest.mark.parametrize(
    "preset, resize, crop", [("ensemble-paper", 366, 320), ("ensemble-paper-im224", 256, 224)]
)
def test_the_paper_ensemble_presets_are_the_authors_recipe(preset, resize, crop):
    """sample_training.sh: -b wideresnet101 -b resnext101 -b densenet201, layer2/3 of the two
    ResNets and features.denseblock2/3 of DenseNet-201, pretrain 1024, target 384, k = 1,
    patch size 3, approx_greedy_coreset -p 0.01, resize/imagesize 366/320 (IM224: 256/224)."""
    members = member_configs(preset_values(preset))
    assert [(m.backbone, m.layers) for m in members] == [
        ("wide_resnet101_2", ("layer2", "layer3")),
        ("resnext101_32x8d", ("layer2", "layer3")),
        ("densenet201", ("denseblock2", "denseblock3")),
    ]
    for member in members:
        assert (member.pretrain_embed_dimension, member.target_embed_dimension) == (1024, 384)
        assert (member.num_neighbors, member.patch_size, member.patch_stride) == (1, 3, 1)
        assert (member.sampler, member.coreset_fraction) == ("approx_greedy_coreset", 0.01)
        assert (member.resize, member.image_shape) == (resize, (crop, crop))
        assert member.seed == 0 and member.distance == "squared_l2" and not member.reweight
    # a preset after it wins where it sets a field; explicit values win over both
    values = {**preset_values(f"{preset},coreset-10"), "crop": 64, "resize": 72}
    assert {(m.coreset_fraction, m.image_shape) for m in member_configs(values)} == {
        (0.1, (64, 64))
    }


def test_member_configs_split_backbones_and_layer_groups():
    values = {"backbone": "mobilenet_v2, resnet18", "layers": ("layer2",), "seed": 3}
    assert [c.layers for c in member_configs(values)] == [("layer2",), ("layer2",)]  # for all
    members = member_configs({**values, "layers": (("stride16",), ("layer2",))})
    assert [(c.backbone, c.layers, c.seed) for c in members] == [
        ("mobilenet_v2", ("stride16",), 3),
        ("resnet18", ("layer2",), 3),
    ]
    assert [c.layers for c in member_configs({"backbone": "a,b"})] == [None, None]
    with pytest.raises(ValueError, match=r"layers gives 3 ';'-separated groups for 2 backbones"):
        member_configs({"backbone": "a,b", "layers": (("x",), ("y",), ("z",))})
    with pytest.raises(ValueError, match="backbone: expected one or more comma-separated"):
        member_configs({"backbone": " , "})


def test_bank_rows_is_the_one_bank_size_rule():
    from patchcore_jax.config import bank_rows

    assert bank_rows(1000, "approx_greedy_coreset", 0.1) == 100
    assert bank_rows(1000, "random", 0.0001) == 1  # at least one row
    assert bank_rows(999, "learned_proxies", 0.5) == 499
    assert bank_rows(1000, "identity", 0.1) == 1000  # every row
    assert PatchCoreConfig(sampler="random", coreset_fraction=0.25).bank_rows(10) == 2
