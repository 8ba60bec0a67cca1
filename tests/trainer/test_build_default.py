from pathlib import Path

from trainer.build_default import build_parser, finetune_argv, world_model_argv

TOKENIZER, TOKENS = Path("w/tokenizer"), Path("w/tokens.npz")


def test_world_model_stage_passes_the_positive_fraction():
    args = build_parser().parse_args(["--device", "cuda", "--world-model-steps", "1500", "--world-model-batch-size",
                                      "32", "--world-model-positive-fraction", "0.25", "--precision", "float32"])
    assert world_model_argv(args, TOKENIZER, TOKENS) == [
        "--tokenizer", "w/tokenizer", "--token-cache", "w/tokens.npz", "--device", "cuda", "--precision", "float32",
        "--steps", "1500", "--batch-size", "32", "--positive-fraction", "0.25"]
    default = build_parser().parse_args([])
    assert world_model_argv(default, TOKENIZER, TOKENS)[-2:] == ["--positive-fraction", "0.0"]


def test_finetune_stage_is_off_by_default_and_starts_from_the_output():
    assert finetune_argv(build_parser().parse_args([]), TOKENIZER, TOKENS) is None
    args = build_parser().parse_args(["--device", "cuda", "--out", "ckpt", "--work-dir", "w", "--finetune-steps",
                                      "600", "--finetune-device", "cpu", "--finetune-threads", "1"])
    assert finetune_argv(args, TOKENIZER, TOKENS) == [
        "--tokenizer", "w/tokenizer", "--token-cache", "w/tokens.npz", "--device", "cpu", "--precision", "auto",
        "--init-from", "ckpt",
        "--out", "ckpt", "--work-dir", "w/world_model_finetune_work", "--steps", "600", "--batch-size", "8",
        "--lr", "0.0002", "--warmup-steps", "20", "--positive-fraction", "0.25", "--threads", "1"]
    same_device = build_parser().parse_args(["--device", "cuda", "--finetune-steps", "5"])
    assert finetune_argv(same_device, TOKENIZER, TOKENS)[4:6] == ["--device", "cuda"]
