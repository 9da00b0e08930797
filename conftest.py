"""Shared by ``pytest`` (tests/) and ``pytest benches``: items marked ``gpu`` are skipped, with
the reason, where PyTorch sees no CUDA GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
