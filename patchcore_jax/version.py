"""The installed package version, recorded in checkpoints and weight manifests."""

from importlib import metadata


def package_version() -> str:
    """``patchcore-jax``'s installed version, or ``"unknown"`` when run from a bare source tree."""
    try:
        return metadata.version("patchcore-jax")
    except metadata.PackageNotFoundError:
        return "unknown"
