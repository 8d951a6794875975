"""The ``mvtec_ad`` TFDS builder; importing ``mvtec_ad_dataset_builder`` registers it."""
