"""Suite-wide settings.

Tests run torch single-threaded by default: test tensors are small (threading buys little),
distributed tests run several processes per core, and an oversubscribed OpenMP pool spin-waits.
Set CAUSALMIX_TEST_THREADS to change it.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("CAUSALMIX_TEST_THREADS", "1")))
