"""The built wheel, installed non-editable into a fresh virtual environment (offline: the test
environment's packages serve as its dependencies), runs the command line from outside the
repository with the MobileNetV2 weights it ships."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import BOTTLE, REPO_ROOT


def run(*command, cwd, env=None):
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command} exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the package's sources (the checkout stays untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.msgpack", "*.json")
    for folder in ("patchcore_jax", "weights"):  # weights/: package data patchcore_jax/weights/
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", source,
        cwd=root)  # fmt: skip
    (path,) = (root / "dist").glob("patchcore_jax-*.whl")
    return path


def test_the_wheel_ships_the_offline_backbone_and_the_type_marker_but_no_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "patchcore_jax/weights/mobilenet_v2_1.0_224_ptq.tflite" in names
    assert {"patchcore_jax/py.typed", "patchcore_jax/weights/README.md"} <= names
    assert not [name for name in names if name.startswith("data/") or name.endswith(".msgpack")]


def test_a_non_editable_install_fits_and_predicts_with_the_bundled_mobilenet_v2(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    # The test environment's packages (jax, flax, ...) as dependencies: a plain path entry, so
    # its editable patchcore_jax finder (a .pth file there) is not run.
    (site_packages / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    home = tmp_path / "home"  # nothing of the user's: no converted weights, no caches
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    for key in ("PYTHONPATH", "XLA_FLAGS", "PATCHCORE_WEIGHTS"):  # (a checkout on PYTHONPATH
        env.pop(key, None)  # with its egg-info would make pip skip the install)
    install = ["install", "-q", "--no-deps", "--no-index", wheel]
    run(python, "-m", "pip", *install, cwd=tmp_path, env=env)
    images = tmp_path / "good"
    images.mkdir()
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:3]:
        (images / path.name).symlink_to(path)
    imported = "import patchcore_jax; print(patchcore_jax.__file__)"
    where = run(python, "-c", imported, cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(site_packages))
    command = venv / "bin" / "patchcore-jax"
    listed = run(command, "weights", "list", cwd=tmp_path, env=env).stdout
    assert f"weights folder: {home}/.cache/patchcore_jax/weights" in listed
    assert "mobilenet_v2       the bundled TFLite file (offline)" in listed
    fit = ["--backbone", "mobilenet_v2", "--sampler", "random", "--resize", "128", "--crop", "128"]
    run(command, "fit", images, "--out", "model", "--quiet", *fit, cwd=tmp_path, env=env)
    one = next(images.iterdir())
    result = run(command, "predict", "model", one, "--out", "scores", "--no-heatmaps", "--quiet",
                 cwd=tmp_path, env=env)  # fmt: skip
    assert "scored 1 image (" in result.stderr and "of 1 image anomalous" in result.stderr
    header, row = (tmp_path / "scores" / "scores.csv").read_text().splitlines()
    assert row.startswith(f"{one},{one.name},")
