"""preprocess.py against independent Pillow/numpy/torch code written from torchvision's docs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BOTTLE
from PIL import Image

from patchcore_jax.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_ASPECT_RATIO,
    MAX_UPSCALE,
    ImageLoadError,
    ImageNotFoundError,
    ImageWarning,
    MaskWarning,
    check_images,
    check_mask_size,
    iter_image_batches,
    load_image,
    load_images,
    load_mask,
    load_masks,
    to_float,
)

BOTTLE_IMAGE = BOTTLE / "test" / "broken_large" / "000.png"
BOTTLE_MASK = BOTTLE / "ground_truth" / "broken_large" / "000_mask.png"


def torchvision_resize_crop(image: Image.Image, size: int, crop) -> Image.Image:
    """torchvision Resize(size) + CenterCrop(crop) on a PIL image, from torchvision's source.

    _compute_resized_output_size: short, long = (w, h) if w <= h else (h, w);
    new_short, new_long = size, int(size * long / short). F.center_crop:
    crop_top = int(round((image_height - crop_height) / 2.0)), likewise crop_left.
    ``crop``: an int or (height, width), as CenterCrop takes it.
    """
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    crop_top = int(round((new_h - crop_h) / 2.0))
    crop_left = int(round((new_w - crop_w) / 2.0))
    return image.crop((crop_left, crop_top, crop_left + crop_w, crop_top + crop_h))


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_bottle_image_matches_direct_pillow_and_torchvision_semantics():
    image = load_image(BOTTLE_IMAGE)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    # Direct: 900x900 -> 256x256 bilinear, crop offset (256 - 224) / 2 = 16.
    direct = Image.open(BOTTLE_IMAGE).convert("RGB").resize((256, 256), Image.BILINEAR)
    np.testing.assert_array_equal(image, np.asarray(direct)[16:240, 16:240])
    pil = Image.open(BOTTLE_IMAGE).convert("RGB")
    np.testing.assert_array_equal(image, np.asarray(torchvision_resize_crop(pil, 256, 224)))
    # The paper's larger setting (366 / 320) goes through the same rules.
    np.testing.assert_array_equal(
        load_image(BOTTLE_IMAGE, 366, 320), np.asarray(torchvision_resize_crop(pil, 366, 320))
    )


@pytest.mark.shared_data  # the demo's masks are already resized
def test_bottle_mask_keeps_only_pixels_exactly_255_after_resizing():
    mask = load_mask(BOTTLE_MASK, image_path=BOTTLE_IMAGE)
    resized = Image.open(BOTTLE_MASK).resize((256, 256), Image.BILINEAR)
    values = np.asarray(resized)[16:240, 16:240]
    # The reference: ToTensor (value / 255 in float32), then astype(int) truncation.
    reference = (values.astype(np.float32) / np.float32(255)).astype(int) == 1
    np.testing.assert_array_equal(mask, reference)
    assert mask.dtype == bool and mask.shape == (224, 224)
    assert 1000 < mask.sum() < 224 * 224
    # Blurred edges exist and are dropped: a plain "> 0" threshold would give more pixels.
    assert (values > 0).sum() > mask.sum()
    assert not load_mask(None).any() and load_mask(None, 32, 16).shape == (16, 16)


def test_to_float_matches_torch_totensor_normalize_bit_for_bit():
    torch = pytest.importorskip("torch")
    images = np.stack([load_image(BOTTLE_IMAGE), random_rgb(224, 224)])
    ours = to_float(images)
    assert ours.dtype == np.float32 and ours.shape == images.shape
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    expected = tensor.sub(mean).div(std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, expected)
    exact = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(ours, exact, atol=2e-6)
    with pytest.raises(ValueError, match="uint8"):
        to_float(images.astype(np.float32))


@pytest.mark.parametrize(
    ("width", "height", "resized", "left", "top"),
    [
        (300, 200, (384, 256), 80, 16),
        (200, 300, (256, 384), 16, 80),
        (301, 200, (385, 256), 80, 16),  # (385 - 224) / 2 = 80.5 rounds half to even: 80
        (303, 200, (387, 256), 82, 16),  # 81.5 -> 82
        (257, 256, (257, 256), 16, 16),  # 16.5 -> 16; no resize needed on the short side
    ],
)
def test_non_square_images_resize_by_the_shorter_side(tmp_path, width, height, resized, left, top):
    pixels = random_rgb(width, height, seed=width + height)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    expected = Image.fromarray(pixels)
    if resized != (width, height):
        expected = expected.resize(resized, Image.BILINEAR)
    expected = np.asarray(expected)[top : top + 224, left : left + 224]
    np.testing.assert_array_equal(load_image(path), expected)
    np.testing.assert_array_equal(
        load_image(path), np.asarray(torchvision_resize_crop(Image.fromarray(pixels), 256, 224))
    )


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB"])
def test_8bit_modes_convert_to_rgb_like_pil_convert(tmp_path, mode):
    source = Image.fromarray(random_rgb(40, 30, seed=3))
    if mode == "RGBA":
        source = source.convert("RGBA")
        source.putalpha(Image.fromarray(random_rgb(40, 30, seed=4)[..., 0]))
    else:
        source = source.convert(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    source.save(path)
    assert Image.open(path).mode == mode
    image = load_image(path, resize=32, crop=24)
    expected = torchvision_resize_crop(Image.open(path).convert("RGB"), 32, 24)
    np.testing.assert_array_equal(image, np.asarray(expected))
    if mode in ("L", "LA"):
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    if mode == "RGBA":  # alpha is dropped, not composited
        rgb = torchvision_resize_crop(source.convert("RGB"), 32, 24)
        np.testing.assert_array_equal(image, np.asarray(rgb))


@pytest.mark.parametrize(
    ("dtype", "suffix", "mode"),
    [("<u2", "png", "I;16"), (">u2", "tif", "I;16B"), ("<i4", "tif", "I")],
)
def test_16bit_images_are_scaled_not_clipped(tmp_path, dtype, suffix, mode):
    values = np.array([[0, 128, 129, 1000, 32767, 32896, 65406, 65535]], dtype=np.int64)
    values = np.repeat(values, 8, axis=0)
    path = tmp_path / f"gray16.{suffix}"
    Image.fromarray(values.astype(dtype)).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path, resize=8, crop=8)  # 8x8: no resize, no crop
    expected = np.round(values * 255 / 65535).astype(np.uint8)
    assert expected[0].tolist() == [0, 0, 1, 4, 127, 128, 254, 255]
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=-1))
    # Through resizing, a 16-bit image equals its 8-bit version (values 257 * k map to k).
    levels = np.random.default_rng(5).integers(0, 256, (50, 70))
    Image.fromarray((levels * 257).astype(dtype)).save(path)
    eight_bit = Image.fromarray(levels.astype(np.uint8)).convert("RGB")
    np.testing.assert_array_equal(
        load_image(path, 32, 24), np.asarray(torchvision_resize_crop(eight_bit, 32, 24))
    )


def test_out_of_range_32bit_image_is_an_error(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(path)
    with pytest.raises(ImageLoadError, match="wide.tif"):
        load_image(path, 4, 4)


def test_unreadable_files_raise_errors_naming_them(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ImageLoadError, match="corrupt.png") as info:
        load_image(corrupt)
    assert info.value.path == corrupt and isinstance(info.value, ValueError)

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(BOTTLE_IMAGE.read_bytes()[:20000])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_mask(truncated)

    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png") as info:
        load_image(missing)
    assert isinstance(info.value, ImageNotFoundError) and isinstance(info.value, ImageLoadError)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask(missing)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="crop"):
        load_image(BOTTLE_IMAGE, resize=200, crop=224)
    with pytest.raises(ValueError, match="resize"):
        load_image(BOTTLE_IMAGE, resize=0, crop=0)


def test_mask_size_must_match_its_image(tmp_path):
    image_path = tmp_path / "img.png"
    mask_path = tmp_path / "img_mask.png"
    Image.fromarray(random_rgb(40, 30)).save(image_path)
    Image.fromarray(np.zeros((30, 41), np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match="img_mask.png.*41x30.*img.png.*40x30"):
        load_mask(mask_path, 32, 24, image_path=image_path)
    with pytest.raises(ValueError, match="img_mask.png"):
        check_mask_size(image_path, mask_path)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(mask_path)
    check_mask_size(image_path, mask_path)
    with pytest.warns(MaskWarning, match="img_mask.png marks no defect pixel"):
        assert not load_mask(mask_path, 32, 24, image_path=image_path).any()


def test_mask_encodings_binary_01_and_mode_1_mean_the_same(tmp_path):
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:40, 20:70] = True
    paths = {}
    for name, array in (("l255", mask * 255), ("l01", mask * 1)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(array.astype(np.uint8)).save(paths[name])
    paths["mode1"] = tmp_path / "mode1.png"
    Image.fromarray(mask).save(paths["mode1"])
    assert Image.open(paths["mode1"]).mode == "1"
    expected = (
        np.asarray(torchvision_resize_crop(Image.fromarray((mask * 255).astype(np.uint8)), 32, 24))
        == 255
    )
    assert 0 < expected.sum() < expected.size
    for path in paths.values():
        np.testing.assert_array_equal(load_mask(path, 32, 24), expected)
    stacked = load_masks([paths["l255"], None], 32, 24)
    np.testing.assert_array_equal(stacked, np.stack([expected, np.zeros_like(expected)]))


def anti_aliased_mask(seed: int = 0) -> np.ndarray:
    """A 0/255 blob with soft edges of intermediate values (as Magnetic Tile masks have)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 20:70] = 255
    edge = np.zeros_like(mask, dtype=bool)
    edge[9:41, 19:71] = True
    edge[11:39, 21:69] = False
    mask[edge] = rng.integers(1, 255, edge.sum())
    return mask


def test_anti_aliased_masks_are_binarised_at_the_threshold_then_follow_the_reference_rule(
    tmp_path,
):
    values = anti_aliased_mask()
    path = tmp_path / "soft.png"
    Image.fromarray(values).save(path)
    for threshold in (128, 200):
        binary = Image.fromarray(np.where(values >= threshold, 255, 0).astype(np.uint8))
        expected = np.asarray(torchvision_resize_crop(binary, 32, 24)) == 255
        with pytest.warns(MaskWarning, match=f"soft.png is not 0/255; binarised at >= {threshold}"):
            np.testing.assert_array_equal(load_mask(path, 32, 24, threshold=threshold), expected)
    # A uniformly grey mask is a defect at 128 and nothing at 129 (then a warning says so).
    grey = tmp_path / "grey.png"
    Image.fromarray((values > 0).astype(np.uint8) * 128).save(grey)
    with pytest.warns(MaskWarning):
        assert load_mask(grey, 32, 24).any()
    with pytest.warns(MaskWarning, match="grey.png marks no defect pixel"):
        assert not load_mask(grey, 32, 24, threshold=129).any()
    with pytest.raises(ValueError, match="threshold"):
        load_mask(path, 32, 24, threshold=0)


def test_load_masks_warns_once_with_the_number_of_binarised_masks(tmp_path, recwarn):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}_mask.png")
        Image.fromarray(anti_aliased_mask(index)).save(paths[-1])
    binary = tmp_path / "binary_mask.png"
    Image.fromarray(np.where(anti_aliased_mask() >= 128, 255, 0).astype(np.uint8)).save(binary)
    masks = load_masks([*paths, binary, None], 32, 24)
    assert masks.shape == (5, 24, 24)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, MaskWarning)]
    assert messages == [f"3 of 4 masks are not 0/255 (e.g. {paths[0]}); binarised at >= 128"]
    np.testing.assert_array_equal(masks[0], masks[3])  # the same blob, binarised the same way


def test_binary_bottle_masks_are_not_binarised_and_keep_their_pixels(recwarn):
    masks = sorted((BOTTLE / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == 63
    for path in masks:
        values = np.asarray(Image.open(path))
        assert set(np.unique(values)) <= {0, 255}, path
    loaded = load_masks(masks[:5])
    assert not [w for w in recwarn if issubclass(w.category, MaskWarning)]
    for path, mask in zip(masks[:5], loaded, strict=True):
        pil = Image.open(path).convert("L")
        np.testing.assert_array_equal(
            mask, np.asarray(torchvision_resize_crop(pil, 256, 224)) == 255
        )


def test_stretch_mode_resizes_the_whole_image_to_height_width(tmp_path):
    path = tmp_path / "tile.png"
    pixels = random_rgb(283, 105)
    Image.fromarray(pixels).save(path)
    image = load_image(path, crop=(96, 224), resize_mode="stretch")
    expected = Image.fromarray(pixels).resize((224, 96), Image.BILINEAR)
    np.testing.assert_array_equal(image, np.asarray(expected))
    mask_path = tmp_path / "tile_mask.png"
    mask = np.zeros((105, 283), np.uint8)
    mask[:, 250:] = 255  # a defect at the far end, which the centre crop would cut away
    Image.fromarray(mask).save(mask_path)
    loaded = load_mask(mask_path, crop=(96, 224), resize_mode="stretch", image_path=path)
    stretched = Image.fromarray(mask).resize((224, 96), Image.BILINEAR)
    np.testing.assert_array_equal(loaded, np.asarray(stretched) == 255)
    assert loaded.any() and not load_mask(mask_path, 256, 224).any()
    batches = list(iter_image_batches([path, path], 2, crop=(96, 224), resize_mode="stretch"))
    np.testing.assert_array_equal(batches[0], np.stack([image, image]))
    with pytest.raises(ValueError, match="resize_mode"):
        load_image(path, resize_mode="squash")


def test_rectangular_crop_is_torchvision_center_crop_height_width():
    pil = Image.open(BOTTLE_IMAGE).convert("RGB")
    image = load_image(BOTTLE_IMAGE, 256, (160, 224))
    assert image.shape == (160, 224, 3)
    np.testing.assert_array_equal(image, np.asarray(torchvision_resize_crop(pil, 256, (160, 224))))
    assert load_mask(BOTTLE_MASK, 256, (160, 224)).shape == (160, 224)


def test_batches_keep_order_and_match_single_loads(tmp_path):
    paths = []
    for index in range(7):
        path = tmp_path / f"{index}.png"
        Image.fromarray(random_rgb(30 + index, 28, seed=index)).save(path)
        paths.append(path)
    expected = load_images(paths, 28, 24)
    assert expected.shape == (7, 24, 24, 3)
    np.testing.assert_array_equal(expected[3], load_image(paths[3], 28, 24))
    for threads in (1, 3):
        batches = list(iter_image_batches(paths, 3, 28, 24, num_threads=threads))
        assert [len(batch) for batch in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), expected)
    assert list(iter_image_batches([], 3, 28, 24)) == []

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    batches = iter_image_batches([*paths[:4], broken], 2, 28, 24, num_threads=2)
    with pytest.raises(ImageLoadError, match="broken.png"):
        list(batches)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_image_batches(paths, 0))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_a_colour_mask_marks_the_pixels_of_any_non_zero_channel(tmp_path, mode):
    """A red (or green, blue) defect is a defect: not gray 76, binarised away (luma would)."""
    defect = np.zeros((24, 32), bool)
    defect[3:9, 4:20] = True  # red
    defect[12:20, 22:30] = True  # blue
    colours = np.zeros((24, 32, 3), np.uint8)
    colours[3:9, 4:20, 0] = 255
    colours[12:20, 22:30, 2] = 255
    colours[0, 0, 1] = 255  # a single green pixel
    defect[0, 0] = True
    image = Image.fromarray(colours)
    if mode == "RGBA":  # an opaque alpha channel is not a defect channel
        image.putalpha(255)
    elif mode == "P":
        image = image.quantize(colors=4)
    path = tmp_path / f"mask_{mode}.png"
    image.save(path)
    gray = tmp_path / "gray.png"
    Image.fromarray(defect.astype(np.uint8) * 255).save(gray)
    # no geometry change (stretched to its own size: every pixel as stored)
    np.testing.assert_array_equal(load_mask(path, 24, (24, 32), resize_mode="stretch"), defect)
    # with a resize, the colour mask follows the gray mask of the same defect exactly
    np.testing.assert_array_equal(load_mask(path, 16, 12), load_mask(gray, 16, 12))


def test_check_images_refuses_images_too_small_for_the_input_and_warns_about_thin_ones(tmp_path):
    def write(name, width, height):
        Image.new("RGB", (width, height), (90, 120, 150)).save(tmp_path / name)
        return tmp_path / name

    resize = 256
    smallest = int(resize / MAX_UPSCALE)  # enlarged exactly MAX_UPSCALE times: still accepted
    paths = [
        write("one.png", 1, 1),
        write("ten.png", 10, 10),
        write("thin.png", 10000, 50),
        write("smallest.png", smallest, smallest),
        write("just_below.png", smallest - 1, smallest + 40),
        write("wide.png", int(resize * (MAX_ASPECT_RATIO + 1)), resize),
        write("fine.png", 300, 280),
    ]
    with pytest.warns(ImageWarning, match=r"1 of 7 images are elongated: .*wide.png \(1280x256"):
        refused = check_images(paths, resize, 224)
    assert [path.name for path, _ in refused] == [
        "one.png",
        "ten.png",
        "thin.png",
        "just_below.png",
    ]
    reasons = dict(refused)
    assert "1x1 pixels is too small" in reasons[paths[0]] and "256x" in reasons[paths[0]]
    assert "10000x50 pixels is too small" in reasons[paths[2]]
    # stretch mode: the limit is per side, against the crop
    assert check_images([paths[3]], 256, (4 * smallest, 4 * smallest), resize_mode="stretch") == []
    ((path, reason),) = check_images(
        [paths[3]], 256, (224, 4 * smallest + 1), resize_mode="stretch"
    )
    assert path == paths[3] and "stretched to 224x257" in reason


def test_check_images_names_unreadable_files_without_raising(tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(BOTTLE_IMAGE.read_bytes()[:20000])
    missing = tmp_path / "missing.png"
    refused = check_images([BOTTLE_IMAGE, truncated, missing], num_threads=2)
    assert [path for path, _ in refused] == [truncated, missing]
    assert "truncated" in refused[0][1] and "no such file" in refused[1][1]
