"""Held-out learnability of the reward label from one real observation, for a recording (diagnosis only).

A small CNN over both views (head and wrist stacked as 6 channels), FiLM-conditioned on a bag of the
instruction's words (which object, which pad), is trained on the training split's frames with the frame's
latched success flag as label (class-balanced loss) and scored on held-out episodes (episode i held out iff
i % 10 == 9, as train-world-model splits): balanced accuracy over all held-out frames (and per task), and the recall of
'yes' on each held-out successful episode's first successful frame. One torch thread, fixed seed.

    .venv/bin/python checkpoints/default_build/reward_frame_probe.py DATA [DATA ...] [--size 32] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from trainer.data import EpisodeDataset
from trainer.world_model_data import split_episode_ids


def load(path: str, size: int) -> dict:
    dataset = EpisodeDataset(path)
    frames, labels, first, episode_ids, instructions, tasks = [], [], [], [], [], []
    for i in range(len(dataset)):
        e = dataset.load(i)
        x = np.concatenate([e.head, e.wrist], axis=-1).astype(np.float32)  # [T+1, 64, 64, 6]
        f = x.shape[1] // size
        x = x.reshape(len(x), size, f, size, f, 6).mean(axis=(2, 4)) / 255.0
        frames.append(x.transpose(0, 3, 1, 2))
        labels.append(e.success.astype(np.int64))
        is_first = np.zeros(len(x), bool)
        if e.succeeded:
            is_first[int(np.argmax(e.success))] = True
        first.append(is_first)
        episode_ids.append(np.full(len(x), i))
        instructions += [e.instruction] * len(x)
        tasks += [e.task] * len(x)
    vocab = sorted({w for t in set(instructions) for w in t.split()})
    bags = {t: np.array([w in t.split() for w in vocab], np.float32) for t in set(instructions)}
    return {"x": np.concatenate(frames), "y": np.concatenate(labels), "first": np.concatenate(first),
            "episode": np.concatenate(episode_ids), "words": np.stack([bags[t] for t in instructions]),
            "task": np.array(tasks), "num_episodes": len(dataset)}


class Probe(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(6, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.film = nn.Linear(vocab, 128)
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [B, 64, s, s]
        gamma, beta = self.film(words).chunk(2, dim=1)
        h = torch.relu(h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        return self.head(h.amax(dim=(2, 3)))


def run(path: str, size: int, epochs: int, seed: int = 0) -> dict:
    d = load(path, size)
    held = np.isin(d["episode"], split_episode_ids(d["num_episodes"])[1])
    torch.manual_seed(seed)
    net = Probe(d["words"].shape[1])
    xt, yt, wt = (torch.from_numpy(d[k][~held]) for k in ("x", "y", "words"))
    counts = torch.bincount(yt, minlength=2).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=g).split(128):
            opt.zero_grad()
            loss_fn(net(xt[idx], wt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()

    @torch.no_grad()
    def predict(mask: np.ndarray) -> np.ndarray:
        x, w = torch.from_numpy(d["x"][mask]), torch.from_numpy(d["words"][mask])
        return torch.cat([net(x[i:i + 1024], w[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)]).numpy()

    def balanced_accuracy(mask: np.ndarray) -> float:
        p, t = predict(mask), d["y"][mask]
        return round(float(0.5 * ((p[t == 1] == 1).mean() + (p[t == 0] == 0).mean())), 3)

    return {"train_frames": int((~held).sum()), "train_yes": int(d["y"][~held].sum()),
            "heldout_frames": int(held.sum()), "heldout_yes": int(d["y"][held].sum()),
            "train_balanced_accuracy": balanced_accuracy(~held), "heldout_balanced_accuracy": balanced_accuracy(held),
            "heldout_first_success_frames": int((held & d["first"]).sum()),
            "heldout_recall_on_first_success_frames": round(float(predict(held & d["first"]).mean()), 3),
            "heldout_balanced_accuracy_per_task": {t: balanced_accuracy(held & (d["task"] == t))
                                                   for t in sorted(set(d["task"].tolist()))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--size", type=int, default=32, choices=(16, 32, 64), help="frames are average-pooled to this")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.data:
        started = time.time()
        result = run(path, args.size, args.epochs)
        print(json.dumps({"data": path, "size": args.size, "epochs": args.epochs, **result,
                          "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
