"""Suite-wide settings.

Tests run torch single-threaded by default: test tensors are small (threading buys little),
distributed tests run several processes per core, and an oversubscribed OpenMP pool spin-waits.
Set CAUSALMIX_TEST_THREADS to change it.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("CAUSALMIX_TEST_THREADS", "1")))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped (with the reason) where none exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
