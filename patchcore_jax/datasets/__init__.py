"""TensorFlow Datasets builders (optional extra ``patchcore-jax[tfds]``; the core never imports
this package). ``mvtec_ad`` builds MVTec AD-layout folders: ``tfds build`` with a manual dir."""
