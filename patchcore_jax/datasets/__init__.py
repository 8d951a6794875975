"""Datasets: where images come from, before ``preprocess`` decodes them.

``folders`` reads the MVTec AD layout and plain image folders (paths only), ``split`` builds that
layout from unsplit folders, ``download`` fetches MVTec AD, ``tfds`` reads TensorFlow Datasets and
``mvtec_ad`` is the TFDS builder of MVTec AD-layout folders. Importing this package imports none
of them; ``tfds`` and ``mvtec_ad`` need the optional extra ``patchcore-jax[tfds]``.
"""
