"""patchcore-jax: PatchCore anomaly detection in JAX/Flax.

Public API::

    from patchcore_jax import Ensemble, PatchCore, PatchCoreConfig, load, save

``load(path, mesh=None)`` opens a saved PatchCore or Ensemble, whichever the folder holds; both
answer the same calls (``fit``, ``predict``, ``score``, ``calibration``, ``describe``, ``save``;
see ``patchcore_jax.ensemble``).

The device stages are importable on their own for use in other JAX programs:
``patchcore_jax.features``, ``patchcore_jax.coreset``, ``patchcore_jax.knn``,
``patchcore_jax.scoring``, ``patchcore_jax.sharding`` and ``patchcore_jax.backbones``. Names are
imported on first use, so ``patchcore_jax.exported`` (the deployment loader) runs with jax and
numpy alone.
"""

_LAZY = {
    "CheckpointError": "patchcore_jax.checkpoint",
    "Ensemble": "patchcore_jax.ensemble",
    "load": "patchcore_jax.checkpoint",
    "save": "patchcore_jax.checkpoint",
    "PatchCoreConfig": "patchcore_jax.config",
    "PatchCore": "patchcore_jax.model",
    "embed_images": "patchcore_jax.features",
}

__all__ = [
    "CheckpointError",
    "Ensemble",
    "PatchCore",
    "PatchCoreConfig",
    "__version__",
    "embed_images",
    "load",
    "save",
]


def __getattr__(name: str) -> object:
    """The public names, imported on first use."""
    import importlib

    if name == "__version__":
        from patchcore_jax.version import package_version

        value = package_version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'patchcore_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the submodules imported so far; no helpers."""
    import types

    modules = {name for name, value in globals().items() if isinstance(value, types.ModuleType)}
    return sorted(set(__all__) | {name for name in modules if not name.startswith("_")})
