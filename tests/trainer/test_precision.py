import pytest
import torch

from trainer import precision
from trainer.precision import PrecisionError, cpu_has_native_bf16, uses_bf16_autocast
from trainer.train_tokenizer import TokenizerTrainConfig
from trainer.train_world_model import WorldModelTrainConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def with_capabilities(monkeypatch, **flags):
    monkeypatch.setattr(precision.torch.cpu, "get_capabilities", lambda: dict(flags))


def test_explicit_precisions_ignore_the_hardware(monkeypatch):
    with_capabilities(monkeypatch, avx512_bf16=True)
    assert [uses_bf16_autocast(p, d) for p in ("float32", "bfloat16") for d in (CPU, CUDA)] == [False, False,
                                                                                             True, True]


@pytest.mark.parametrize(("flags", "native"), [({}, False), ({"avx512_bf16": False, "amx_bf16": False}, False),
                                               ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)])
def test_auto_is_bf16_on_cuda_and_on_cpus_that_compute_it_natively(monkeypatch, flags, native):
    with_capabilities(monkeypatch, **flags)
    assert cpu_has_native_bf16() is native
    assert uses_bf16_autocast("auto", CPU) is native
    assert uses_bf16_autocast("auto", CUDA) is True


def test_an_unknown_precision_is_named_with_the_valid_ones():
    with pytest.raises(PrecisionError, match="precision must be one of auto, float32, bfloat16, got 'fp16'"):
        uses_bf16_autocast("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        WorldModelTrainConfig(out_dir="o", tokenizer_dir="t", data_dirs=("d",), precision="half")
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        TokenizerTrainConfig(out_dir="o", data_dir="d", precision="half")
