"""The shipped reference SFT policy (checkpoints/sft_reference): the start of the RL comparisons, intact."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from trainer.config import PolicyConfig, SFTConfig
from trainer.policy import POLICY_WEIGHTS, load_policy

REFERENCE = Path(__file__).resolve().parents[2] / "checkpoints" / "sft_reference"


def test_reference_sft_policy_loads_with_the_default_config_and_sft_settings():
    policy, metadata = load_policy(REFERENCE)
    assert policy.config == PolicyConfig()
    assert sum(p.numel() for p in policy.parameters()) == 413_362
    assert metadata["stage"] == "sft"
    assert metadata["sft_config"] == asdict(SFTConfig())  # the README's `sft --steps 8000` is the default
    assert (metadata["num_episodes"], metadata["num_samples"]) == (1030, 47158)  # demos2k's successful demos


def test_reference_sft_weights_are_the_ones_its_build_record_measured():
    build = json.loads((REFERENCE / "build.json").read_text())
    digest = hashlib.sha256((REFERENCE / POLICY_WEIGHTS).read_bytes()).hexdigest()
    assert digest == build["policy_sha256"]
    assert {"collect", "sft", "buffer"} <= build["commands"].keys()
