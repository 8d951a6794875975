"""Shared test set-up: 8 virtual CPU devices, one loader for fixtures and data, and the
``shared_data`` marker (tests that need ../shared, skipped only where it is absent)."""

from __future__ import annotations

import os

# Every test process sees 8 CPU devices so sharded stages are exercised; single-device
# behaviour is tested with explicit one-device meshes. Must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
