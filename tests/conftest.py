"""Suite-wide set-up. The environment variables must be set before kernel modules are imported:
Triton reads TRITON_INTERPRET when a kernel is decorated, MuJoCo reads MUJOCO_GL at import."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
