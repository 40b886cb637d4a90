"""The tiny test backbone and image-folder dataset of tests/training, for the CLI tests that train."""

from training.conftest import batch_counter, tiny_folder  # noqa: F401 - fixtures shared with tests/training
