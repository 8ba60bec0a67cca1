"""The online-PPO baseline spends its real-step budget (no runt last rollout) and logs it."""

import json

import pytest
import torch

from trainer.config import OnlinePPOConfig, PolicyConfig, PPOConfig
from trainer.online_ppo import OnlinePPOTrainer
from trainer.policy import VlaPolicy, load_policy

SMALL = PolicyConfig(conv_channels=(4, 4, 8, 8), hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                     text_embed_dim=8, critic_hidden_dim=8)


def train_records(out_dir, total_env_steps: int, ratio_per: str = "chunk") -> list[dict]:
    """Online PPO of a tiny policy with 2 envs and rollouts of 3 chunks (48 steps); its metric records."""
    torch.manual_seed(0)
    config = OnlinePPOConfig(total_env_steps=total_env_steps, num_envs=2, chunks_per_rollout=3)
    ppo = PPOConfig(updates_per_refill=1, minibatch_size=4, ratio_per=ratio_per)
    trainer = OnlinePPOTrainer(VlaPolicy(SMALL), out_dir, config, ppo, max_steps=16)
    trainer.train(progress=False)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ratio_per", ["chunk", "dim"])
def test_online_ppo_respects_the_step_budget(tmp_path, ratio_per):
    # per dim, the learner also checks that the env rollouts' chunk log-probs are its own (it raises otherwise)
    records = train_records(tmp_path, 80, ratio_per)
    # 2 envs x 8 steps per chunk: rollouts of 3, 2 chunks -> 48, 80 steps; 16-step episodes end every 2 chunks
    assert [r["real_env_steps"] for r in records] == [48, 80]
    assert [r["train/episodes"] for r in records] == [2, 4]
    _, meta = load_policy(tmp_path / "policy")
    assert meta["real_env_steps"] == 80 and meta["stage"] == "online_ppo"


def test_online_ppo_ends_without_a_runt_rollout(tmp_path):
    """64 steps with rollouts of 3 chunks (48 steps): one rollout of 4 chunks, not 48 then a 16-step runt."""
    records = train_records(tmp_path, 64)
    assert [(r["iteration"], r["real_env_steps"]) for r in records] == [(1, 64)]
