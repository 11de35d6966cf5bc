import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests on machines without CUDA (never fake them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
