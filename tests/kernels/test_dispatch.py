"""kernels.dispatch: which implementation runs for which device and setting, and that each gives the same
answer through the public entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import TOLERANCES, independent, make_batch, shared

from kernels import dispatch, reference, torch_attention
from kernels.paged_attention import runs_in_interpreter as triton_runs_in_interpreter


@pytest.fixture(autouse=True)
def restore_default_backend():
    yield
    dispatch.set_backend("auto")


def test_auto_picks_triton_on_cuda_and_torch_on_cpu():
    assert dispatch.get_backend() == "auto"
    assert dispatch.resolve_backend(torch.device("cpu")) == "torch"
    assert dispatch.resolve_backend(torch.device("cuda", 0)) == "triton"
    assert dispatch.resolve_backend(torch.device("cpu"), "triton") == "triton"
    assert dispatch.resolve_backend(torch.device("cuda"), "reference") == "reference"


def test_set_backend_and_use_backend_restore_the_default():
    dispatch.set_backend("reference")
    assert dispatch.resolve_backend(torch.device("cpu")) == "reference"
    with dispatch.use_backend("triton"):
        assert dispatch.get_backend() == "triton"
    assert dispatch.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; expected one of auto, torch, triton"):
        dispatch.set_backend("cuda")


def test_a_call_runs_the_chosen_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_attention, "paged_attention", lambda *args: calls.append("torch") or args[0])
    monkeypatch.setattr(reference, "paged_attention", lambda *args: calls.append("reference") or args[0])
    batch = make_batch([independent((3, 1))], 4, 1, 1, head_dim=8)
    dispatch.paged_attention(*batch.attention_args())
    dispatch.paged_attention(*batch.attention_args(), backend="reference")
    with dispatch.use_backend("reference"):
        dispatch.paged_attention(*batch.attention_args())
        dispatch.paged_attention(*batch.attention_args(), backend="torch")  # the argument wins over the setting
    assert calls == ["torch", "reference", "reference", "torch"]


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=pytest.mark.skipif(not triton_runs_in_interpreter(),
                                                        reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
        "reference",
    ],
)
def test_every_backend_gives_the_reference_answer(backend):
    batch = make_batch([shared(6, (9, 1), (8, 2)), independent((7, 3))], 4, 2, 2, head_dim=8, seed=41)
    expected = reference.paged_attention(*batch.attention_args())
    tolerance = TOLERANCES[torch.float32]
    torch.testing.assert_close(dispatch.paged_attention(*batch.attention_args(), backend=backend), expected,
                               **tolerance)
    torch.testing.assert_close(dispatch.cascade_attention(*batch.cascade_args(), backend=backend), expected,
                               **tolerance)
    out, lse = dispatch.paged_attention_with_lse(*batch.attention_args(), backend=backend)
    merged, merged_lse = dispatch.merge_attention_states(out, lse, torch.zeros_like(out),
                                                         torch.full_like(lse, float("-inf")), backend=backend)
    torch.testing.assert_close(merged, expected, **tolerance)
    torch.testing.assert_close(merged_lse, lse, **tolerance)

    key = torch.randn(3, 2, 8)
    k_cache, v_cache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    dispatch.store_kv(key, -key, k_cache, v_cache, torch.tensor([7, -1, 1]), backend=backend)
    assert torch.equal(k_cache[1, 3], key[0]) and torch.equal(v_cache[0, 1], -key[2])
    assert int(k_cache.ne(0).any(-1).any(-1).sum()) == 2


def test_forcing_triton_on_cpu_without_the_interpreter_says_what_to_set():
    script = (
        "import torch\n"
        "from kernels import dispatch\n"
        "x = torch.zeros(1, 1, 8)\n"
        "c = torch.zeros(1, 4, 1, 8)\n"
        "try:\n"
        "    dispatch.store_kv(x, x, c, c.clone(), torch.tensor([0]), backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2], check=True)
    assert result.stdout.strip() == (
        "the triton backend on cpu tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
        "the kernels"
    )
