"""image_reader.py and crop_cache.py: images read in worker processes and through the
decoded-crop cache give the order and the bits of ``preprocess.load_image``, name the files
they cannot read as it does, and a second read through the cache decodes nothing."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BOTTLE, REPO_ROOT
from PIL import Image

from patchcore_jax import crop_cache, preprocess
from patchcore_jax.image_reader import ImageReader
from patchcore_jax.preprocess import ImageLoadError, check_images, iter_image_batches, load_images

GEOMETRY = {"resize": 40, "crop": 32}  # small crops: the decode is what is tested


def random_pixels(height, width, channels, seed, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, (height, width, channels), dtype=dtype)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Two real bottle PNGs (900x900 RGB) and one file of each mode the reader converts."""
    folder = tmp_path_factory.mktemp("reader")
    paths = [BOTTLE / "train/good/000.png", BOTTLE / "test/broken_large/000.png"]
    made = {
        "rgba.png": Image.fromarray(random_pixels(50, 61, 4, 1), "RGBA"),
        "grey.png": Image.fromarray(random_pixels(47, 52, 1, 2)[:, :, 0], "L"),
        "grey16.png": Image.fromarray(random_pixels(45, 58, 1, 3, np.uint16, 65536)[:, :, 0]),
        "palette.png": Image.fromarray(random_pixels(64, 48, 3, 4)).quantize(colors=16),
        "photo.jpg": Image.fromarray(random_pixels(70, 90, 3, 5)),
        "cmyk.jpg": Image.fromarray(random_pixels(41, 66, 3, 6)).convert("CMYK"),
    }
    for name, image in made.items():
        image.save(folder / name)
        paths.append(folder / name)
    assert Image.open(folder / "grey16.png").mode.startswith("I")  # 16 bits really stored
    return paths


def test_worker_processes_and_the_cache_give_the_order_and_bits_of_load_image(
    image_files, tmp_path
):
    expected = load_images(image_files, **GEOMETRY)
    readers = {
        "threads": ImageReader(),
        "2 workers": ImageReader(workers=2),
        "1 worker, cache": ImageReader(workers=1, cache_dir=tmp_path / "cache"),
        "threads, warm cache": ImageReader(cache_dir=tmp_path / "cache"),
        "2 workers, warm cache": ImageReader(workers=2, cache_dir=tmp_path / "cache"),
    }
    for name, reader in readers.items():
        batches = list(iter_image_batches(image_files, 3, **GEOMETRY, reader=reader))
        assert [len(batch) for batch in batches] == [3, 3, 2], name
        np.testing.assert_array_equal(np.concatenate(batches), expected, err_msg=name)
        assert batches[0].dtype == np.uint8, name
    assert (readers["1 worker, cache"].decoded, readers["1 worker, cache"].from_cache) == (8, 0)
    for name in ("threads, warm cache", "2 workers, warm cache"):
        assert (readers[name].decoded, readers[name].from_cache) == (0, 8), name
    # the image check reads the same way: same verdicts, and a warm cache decodes nothing
    warm = ImageReader(workers=2, cache_dir=tmp_path / "cache")
    assert check_images(image_files, **GEOMETRY, reader=warm) == []
    assert (warm.decoded, warm.from_cache) == (0, 8)


def test_the_image_check_fills_the_cache_so_the_read_after_it_decodes_nothing(tmp_path):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(random_pixels(36 + index, 44, 3, index)).save(paths[-1])
    reader = ImageReader(workers=1, cache_dir=tmp_path / "cache")
    assert check_images(paths, **GEOMETRY, reader=reader) == []
    assert (reader.decoded, reader.from_cache) == (3, 0)
    (batch,) = iter_image_batches(paths, 4, **GEOMETRY, reader=reader)
    assert (reader.decoded, reader.from_cache) == (3, 3)
    np.testing.assert_array_equal(batch, load_images(paths, **GEOMETRY))
    assert reader.describe().startswith("crops: 3 from cache, 3 decoded")


def test_an_unreadable_image_in_a_worker_raises_the_error_load_image_raises(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(random_pixels(40, 40, 3, 0)).save(good)
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.png"
    broken.write_bytes(b"not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((BOTTLE / "train/good/000.png").read_bytes()[:20000])
    for bad in (broken, missing, truncated):
        with pytest.raises(ImageLoadError) as here:
            preprocess.load_image(bad, **GEOMETRY)
        for reader in (ImageReader(workers=2), ImageReader(workers=1, cache_dir=tmp_path / "c")):
            with pytest.raises(ImageLoadError) as there:
                list(iter_image_batches([good, bad], 1, **GEOMETRY, reader=reader))
            assert type(there.value) is type(here.value)  # ImageNotFoundError stays one
            assert str(there.value) == str(here.value) and there.value.path == bad
    paths = [good, broken, missing, truncated]
    in_process = check_images(paths, **GEOMETRY, num_threads=1)
    assert [path for path, _ in in_process] == [broken, missing, truncated]
    assert check_images(paths, **GEOMETRY, reader=ImageReader(workers=2)) == in_process


def test_the_worker_processes_import_no_jax(tmp_path):
    """They are spawned and import the main module and the reader's modules: none imports jax
    (nor does the command line's module, which ``python -m patchcore_jax.cli`` makes main)."""
    path = tmp_path / "image.png"
    Image.fromarray(random_pixels(40, 40, 3, 0)).save(path)
    reader = ImageReader(workers=1)
    list(iter_image_batches([path], 1, **GEOMETRY, reader=reader))
    loaded = "sorted(m for m in __import__('sys').modules if m.split('.')[0] in ('jax', 'flax'))"
    (imported,) = reader.map(eval, [loaded], in_flight=1)
    assert imported == []
    (reader_loaded,) = reader.map(
        eval, ["'patchcore_jax.preprocess' in __import__('sys').modules"], in_flight=1
    )
    assert reader_loaded  # the check above ran where the images were read
    modules = "patchcore_jax.preprocess, patchcore_jax.image_reader, patchcore_jax.cli"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m == 'jax'))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_a_damaged_cache_entry_is_decoded_again_never_trusted(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(random_pixels(48, 40, 3, 7)).save(path)
    expected = load_images([path], **GEOMETRY)
    cache = tmp_path / "cache"
    list(iter_image_batches([path], 1, **GEOMETRY, reader=ImageReader(cache_dir=cache)))
    (entry,) = cache.rglob("*.npy")
    whole = entry.read_bytes()
    assert entry.stem == crop_cache.content_key(path)
    damages = {
        "truncated": whole[: len(whole) - 7],
        "longer": whole + b"\0",
        "no header": b"\0" * len(whole),
        "other shape": _npy(np.zeros((32, 31, 3), np.uint8)),
        "other dtype": _npy(np.zeros((32, 32, 3), np.int16)),
    }
    for damage, content in damages.items():
        entry.write_bytes(content)
        reader = ImageReader(cache_dir=cache)
        (batch,) = iter_image_batches([path], 1, **GEOMETRY, reader=reader)
        np.testing.assert_array_equal(batch, expected, err_msg=damage)
        assert (reader.decoded, reader.from_cache) == (1, 0), damage
        assert entry.read_bytes() == whole, damage  # rewritten whole


def _npy(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_the_cache_key_is_the_file_content_and_the_geometry(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(random_pixels(48, 40, 3, 8)).save(path)
    cache = tmp_path / "cache"

    def read(paths, **geometry):
        reader = ImageReader(cache_dir=cache)
        images = np.concatenate(list(iter_image_batches(paths, 2, **geometry, reader=reader)))
        np.testing.assert_array_equal(images, load_images(paths, **geometry))
        return reader.decoded, reader.from_cache

    assert read([path], **GEOMETRY) == (1, 0)
    copy = tmp_path / "elsewhere.png"
    shutil.copy(path, copy)
    assert read([path, copy], **GEOMETRY) == (0, 2)  # same bytes under another name: a hit
    stat = path.stat()
    Image.fromarray(random_pixels(48, 40, 3, 9)).save(path)  # new content, old mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read([path], **GEOMETRY) == (1, 0)
    assert read([path], resize=40, crop=(32, 24)) == (1, 0)  # another geometry: its own
    assert read([path], resize=40, crop=32, resize_mode="stretch") == (1, 0)
    assert read([path, copy], **GEOMETRY) == (0, 2)
    assert len(list(cache.iterdir())) == 3  # one folder per geometry


def test_bad_reader_arguments_are_refused_naming_them(tmp_path):
    for workers in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a whole number >= 0"):
            ImageReader(workers=workers)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OSError, match="--cache-dir"):
        ImageReader(cache_dir=a_file)
    assert ImageReader(cache_dir=tmp_path / "new/cache").cache_dir == tmp_path / "new/cache"


def test_ctrl_c_to_the_terminal_process_group_leaves_the_workers_reading(tmp_path):
    """Ctrl-C reaches every process of the group: the workers ignore it (this process stops at
    its next safe point, ``interrupt``), so the pool is not broken under the reading."""
    import signal
    import time

    from patchcore_jax import image_reader

    path = tmp_path / "image.png"
    Image.fromarray(random_pixels(40, 40, 3, 0)).save(path)
    reader = ImageReader(workers=1)
    (first,) = iter_image_batches([path], 1, **GEOMETRY, reader=reader)
    (worker,) = image_reader._POOLS[1]._processes
    os.kill(worker, signal.SIGINT)
    time.sleep(0.2)
    (again,) = iter_image_batches([path], 1, **GEOMETRY, reader=reader)
    np.testing.assert_array_equal(again, first)
    assert list(image_reader._POOLS[1]._processes) == [worker]


def test_the_default_worker_count_leaves_the_main_process_a_cpu_and_small_machines_threads(
    monkeypatch,
):
    from patchcore_jax import image_reader

    for cpus, workers in [(1, 0), (2, 0), (3, 0), (4, 3), (9, 8), (16, 8), (64, 8)]:
        monkeypatch.setattr(image_reader, "available_cpus", lambda cpus=cpus: cpus)
        assert image_reader.default_workers() == workers, cpus
