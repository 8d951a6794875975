"""Shared test set-up: 8 virtual CPU devices, one loader for fixtures and data, and the
``shared_data`` marker (tests that need ../shared, skipped only where it is absent)."""

from __future__ import annotations

import os
import tempfile

# Every test process sees 8 CPU devices so sharded stages are exercised; single-device
# behaviour is tested with explicit one-device meshes. Must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run, never the user's: the command-line runs and the
# exported-model loader (which turns JAX's persistent cache on by default) keep programs here.
os.environ.setdefault(
    "PATCHCORE_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "pcj-test-xla")
)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from fixture_data import (  # noqa: E402, F401
    BOTTLE,
    DEMO_BOTTLE,
    FIXTURES,
    FULL_BOTTLE,
    HAVE_SHARED,
    REPO_ROOT,
    SHARED,
    WEIGHTS,
    load_fixture,
)


def pytest_collection_modifyitems(config, items):
    if HAVE_SHARED:
        return
    skip = pytest.mark.skip(reason=f"needs the shared data folder {SHARED} (CI has it)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not BOTTLE.is_dir():
        raise FileNotFoundError(f"MVTec bottle data not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A small real category (test_cli, test_workflows): MVTec layout with 10 train images,
    3 good and 3 defective test images (with masks)."""
    root = tmp_path_factory.mktemp("bottle_subset")
    links = list(sorted((BOTTLE / "train/good").glob("*.png"))[:10])
    links += sorted((BOTTLE / "test/good").glob("*.png"))[:3]
    for defect in ("broken_large", "broken_small", "contamination"):
        image = sorted((BOTTLE / "test" / defect).glob("*.png"))[0]
        links += [image, BOTTLE / "ground_truth" / defect / f"{image.stem}_mask.png"]
    for source in links:
        target = root / source.relative_to(BOTTLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    return root
