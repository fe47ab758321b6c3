"""Suite-wide markers: GPU tests skip without CUDA; everything else runs on CPU."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
