"""Shared test set-up: 8 virtual CPU devices, and one loader for ../shared fixtures and data."""

from __future__ import annotations

import os

# Every test process sees 8 CPU devices so sharded stages are exercised; single-device
# behaviour is tested with explicit one-device meshes. Must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from fixture_data import BOTTLE, FIXTURES, REPO_ROOT, SHARED, WEIGHTS, load_fixture  # noqa: E402, F401


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not BOTTLE.is_dir():
        raise FileNotFoundError(f"MVTec bottle data not found at {BOTTLE}")
    return BOTTLE
