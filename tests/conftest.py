"""Suite-wide set-up. The environment variables must be set before kernel modules are imported:
Triton reads TRITON_INTERPRET when a kernel is decorated, MuJoCo reads MUJOCO_GL at import."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import contextlib  # noqa: E402

import pytest  # noqa: E402

# MuJoCo's EGL renderer here is Mesa llvmpipe, which loads its own LLVM; importing triton (another LLVM) into a
# process that already holds a GL context segfaults (measured: render, then `import triton`). A full run imports
# triton while collecting the kernel tests; a subset such as tests/trainer/ must not depend on that order.
with contextlib.suppress(ImportError):
    import triton  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
