import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). The flag must be set before triton is
# first imported (timm imports it): the interpreter replaces triton.language's own jitted helpers at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests on machines without CUDA (never fake them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
