"""Branched chunk rollouts of the policy in the served world model (PAPER.md step 3a-3b).

From each real start state: CreateStates once, then G branches that each roll the policy forward n
chunks through Imagine (past the model's window of max_chunks_per_branch chunks, from a new state made of
the last imagined observation). A branch's reward after a chunk is the model's success judgement; success
latches `done`, so a finished branch is not rolled further. All but the last chunk keep their state;
every created or kept state is released before returning, also when something fails.

Several trainers may share one server: when its KV cache is full of states that other clients hold, a call fails
with RESOURCE_EXHAUSTED. The rollout then releases everything it holds (which may be what blocks the others), waits
with backoff and starts again from the same start states, a bounded number of times (`capacity_retry`); a refusal
it causes alone fails at once. `imagine/seconds` in the trainer's metrics includes those waits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from trainer.policy import VlaPolicy, make_batch
from trainer.rollout_client import RetryPolicy, RolloutServerError, WorldModelClient

# Waits while other clients' states fill the server's KV cache: 7 waits of 1, 2, 4, 8, 16, 30, 30 s (+- 20%).
CAPACITY_RETRY = RetryPolicy(max_attempts=8, initial_backoff=1.0, max_backoff=30.0)
KV_EXHAUSTED = "KV cache exhausted"  # how the engine's CapacityError for a cache full of held states begins
_BACKOFF_RNG = random.Random()  # seeded by the OS: trainers refused together do not come back together

POLICY_BATCH = 1024  # rows per policy forward: bounds activation memory at M = 1024, G > 1


@dataclass(frozen=True, eq=False)
class RecordedOrigin:
    """Where a recorded observation came from: its episode's task, env seed and the actions before it, which
    replay it exactly in the env (trainer.sim_imagination steps branches from there)."""

    task: str
    seed: int
    actions: np.ndarray  # [t, action_dim] float32, the episode's actions before the observation


@dataclass(frozen=True, eq=False)
class StartState:
    """A real observation to branch from."""

    instruction: str
    head: np.ndarray  # [H, W, 3] uint8
    wrist: np.ndarray  # [H, W, 3] uint8
    origin: RecordedOrigin | None = None  # set for states of a recorded buffer


@dataclass(frozen=True)
class ImaginedRollouts:
    """B = M * G branches of up to T = n chunks each. Entries of steps after `done` are zero and invalid."""

    head: np.ndarray  # [B, T, H, W, 3] uint8: the observation each chunk was chosen from
    wrist: np.ndarray  # [B, T, H, W, 3] uint8
    instructions: list[str]  # [B]
    bins: torch.Tensor  # [B, T, D] int64
    log_probs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T]
    rewards: torch.Tensor  # [B, T] 1.0 where the model judged success after the chunk
    success_prob: torch.Tensor  # [B, T]
    terminated: torch.Tensor  # [B, T] bool
    valid: torch.Tensor  # [B, T] bool
    bootstrap_values: torch.Tensor  # [B] V of the last imagined observation (0 where the branch succeeded)

    @property
    def num_branches(self) -> int:
        return int(self.bins.shape[0])


def _policy_step(policy: VlaPolicy, head: np.ndarray, wrist: np.ndarray, instructions: list[str],
                 generator: torch.Generator, temperature: float) -> tuple[torch.Tensor, ...]:
    """act() in slices of POLICY_BATCH rows. Returns (actions [N, k, d], bins, log_probs, values)."""
    parts = []
    for s in range(0, len(instructions), POLICY_BATCH):
        batch = make_batch(head[s: s + POLICY_BATCH], wrist[s: s + POLICY_BATCH], instructions[s: s + POLICY_BATCH],
                           policy.config)
        parts.append(policy.act(batch, generator=generator, temperature=temperature))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def policy_values(policy: VlaPolicy, head: np.ndarray, wrist: np.ndarray, instructions: list[str]) -> torch.Tensor:
    """Critic values of observations, in slices. -> [N]"""
    out = []
    with torch.no_grad():
        for s in range(0, len(instructions), POLICY_BATCH):
            batch = make_batch(head[s: s + POLICY_BATCH], wrist[s: s + POLICY_BATCH],
                               instructions[s: s + POLICY_BATCH], policy.config)
            out.append(policy(batch).values)
    return torch.cat(out) if out else torch.zeros(0)


class Imaginer:
    """Runs branched rollouts over one client, splitting requests to the server's limits."""

    real_env_steps = 0  # the served model spends no real interaction
    capacity_retry = CAPACITY_RETRY
    num_capacity_retries = 0  # rollouts started again after RESOURCE_EXHAUSTED, over this imaginer's life

    def __init__(self, client: WorldModelClient, max_parallel_requests: int = 4,
                 imagine_timeout: float = 1800.0, capacity_retry: RetryPolicy = CAPACITY_RETRY) -> None:
        """`imagine_timeout`: deadline in seconds of one CreateStates or Imagine call; a CPU-served world
        model can take minutes for a few thousand branches, far beyond the client's default. `capacity_retry`:
        attempts and backoff of a whole rollout that the server refused with RESOURCE_EXHAUSTED."""
        self.client = client
        self.info = client.model_info()
        self.max_parallel_requests = max_parallel_requests
        self.imagine_timeout = imagine_timeout
        self.capacity_retry = capacity_retry

    def rollout(self, policy: VlaPolicy, starts: Sequence[StartState], branches_per_state: int, horizon_chunks: int,
                generator: torch.Generator, seed_base: int, world_model_temperature: float = 1.0,
                reward_threshold: float = 0.5, policy_temperature: float = 1.0) -> ImaginedRollouts:
        """Rolls G = branches_per_state branches per start state for n = horizon_chunks chunks.

        A branch longer than the model's window (max_chunks_per_branch) continues from a new state created
        from its last imagined observation: the model then conditions on that observation alone, as at a
        real start state, instead of on a stream longer than it was trained on."""
        if horizon_chunks < 1:
            raise ValueError(f"horizon_chunks must be >= 1, got {horizon_chunks}")
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            owned: list[str] = []  # every state this attempt created or kept, released in `finally`
            try:
                state_ids = self._create_states(starts, owned)  # a failing slice cannot leak the earlier ones
                return self._roll(policy, starts, state_ids, branches_per_state, horizon_chunks, generator,
                                  seed_base, world_model_temperature, reward_threshold, policy_temperature, owned)
            except RolloutServerError as exc:
                if attempt >= self.capacity_retry.max_attempts or not self._others_fill_the_cache(exc, len(owned)):
                    if attempt == 1:
                        raise
                    raise RolloutServerError(exc.method, exc.code, f"{exc.details} (the rollout gave up after "
                                             f"{attempt} attempts and {waited:.0f} s of waiting for other clients' "
                                             "states)", attempt) from None
            finally:
                self._release(owned)
            self.num_capacity_retries += 1  # the next attempt draws other policy samples from `generator`
            wait = self.capacity_retry.backoff(attempt - 1, _BACKOFF_RNG)
            waited += wait
            time.sleep(wait)

    def _others_fill_the_cache(self, exc: RolloutServerError, num_owned: int) -> bool:
        """Whether waiting can help: the KV cache is full and other clients hold states in it. A refusal this
        rollout causes alone (too large for the cache, the per-client state limit, an oversize message) fails now."""
        if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or not exc.details.startswith(KV_EXHAUSTED):
            return False
        return self.client.stats().live_states > num_owned

    def _release(self, state_ids: list[str]) -> None:
        for s in range(0, len(state_ids), max(1, self.info.max_states_per_request)):
            self.client.release(state_ids[s: s + self.info.max_states_per_request])

    def _create_states(self, starts: Sequence[StartState], owned: list[str] | None = None) -> list[str]:
        """CreateStates in slices of the server's limit; with `owned`, each slice's ids join it as they come."""
        ids: list[str] = []
        step = max(1, self.info.max_states_per_request)
        for s in range(0, len(starts), step):
            part = starts[s: s + step]
            created = self.client.create_states([x.instruction for x in part],
                                                [{"head": x.head, "wrist": x.wrist} for x in part],
                                                timeout=self.imagine_timeout)
            ids += created
            if owned is not None:
                owned += created
        return ids

    def _roll(self, policy: VlaPolicy, starts: Sequence[StartState], state_ids: list[str], g: int, n: int,
              generator: torch.Generator, seed_base: int, wm_temperature: float, threshold: float,
              policy_temperature: float, owned: list[str]) -> ImaginedRollouts:
        b = len(starts) * g
        instructions = [starts[i // g].instruction for i in range(b)]
        head = np.stack([starts[i // g].head for i in range(b)])  # [B, H, W, 3]
        wrist = np.stack([starts[i // g].wrist for i in range(b)])
        current = [state_ids[i // g] for i in range(b)]
        d = policy.config.num_action_tokens
        out_head = np.zeros((b, n, *head.shape[1:]), dtype=np.uint8)
        out_wrist = np.zeros_like(out_head)
        bins = torch.zeros((b, n, d), dtype=torch.int64)
        log_probs, values, rewards, probs = (torch.zeros((b, n)) for _ in range(4))
        terminated = torch.zeros((b, n), dtype=torch.bool)
        valid = torch.zeros((b, n), dtype=torch.bool)
        active = np.arange(b)
        window = self.info.max_chunks_per_branch
        for c in range(n):
            if c and c % window == 0:  # the model's window is full: continue from the imagined observation
                restarts = [StartState(instructions[i], head[i], wrist[i]) for i in active]
                for i, state_id in zip(active, self._create_states(restarts, owned), strict=True):
                    current[i] = state_id
            actions, chunk_bins, chunk_logp, chunk_values = _policy_step(
                policy, head[active], wrist[active], [instructions[i] for i in active], generator, policy_temperature)
            rows = torch.from_numpy(active)
            out_head[active, c], out_wrist[active, c] = head[active], wrist[active]
            bins[rows, c], log_probs[rows, c], values[rows, c] = chunk_bins, chunk_logp, chunk_values
            valid[rows, c] = True
            seeds = [seed_base + int(i) * n + c for i in active]
            keep = c < n - 1 and (c + 1) % window != 0  # no state is needed past the window's last chunk
            results = self._imagine([current[i] for i in active], actions.numpy(), seeds, keep=keep,
                                    temperature=wm_temperature, owned=owned)
            still_active = []
            for row, i in enumerate(active):
                result = results[row]
                if result.state_id is not None:
                    current[i] = result.state_id
                probs[i, c] = result.success_prob
                success = result.success_prob > threshold
                rewards[i, c] = float(success)
                terminated[i, c] = success
                head[i], wrist[i] = result.images["head"], result.images["wrist"]
                if not success:
                    still_active.append(i)
            active = np.asarray(still_active, dtype=np.int64)
            if active.size == 0:
                break
        bootstrap = torch.zeros(b)
        if active.size:
            bootstrap[torch.from_numpy(active)] = policy_values(policy, head[active], wrist[active],
                                                                [instructions[i] for i in active])
        return ImaginedRollouts(out_head, out_wrist, instructions, bins, log_probs, values, rewards, probs,
                                terminated, valid, bootstrap)

    def _imagine(self, state_ids: list[str], actions: np.ndarray, seeds: list[int], keep: bool, temperature: float,
                 owned: list[str]) -> list:
        """One Imagine per slice of max_branches_per_request, a few in flight at once; results in input order.
        Kept states go into `owned` as they arrive, so a failing slice cannot leak its siblings' states."""
        step = max(1, self.info.max_branches_per_request)
        slices = [(s, min(s + step, len(state_ids))) for s in range(0, len(state_ids), step)]

        def run(bounds: tuple[int, int]) -> list:
            lo, hi = bounds
            got = [None] * (hi - lo)
            for result in self.client.imagine(state_ids[lo:hi], actions[lo:hi], seeds=seeds[lo:hi], keep_state=keep,
                                              temperature=temperature, return_images=True,
                                              timeout=self.imagine_timeout):
                got[result.index] = result
                if result.state_id is not None:
                    owned.append(result.state_id)  # list.append is atomic under the GIL
            missing = [lo + k for k, r in enumerate(got) if r is None]
            if missing:
                raise RuntimeError(f"Imagine stream ended without results for branches {missing[:8]}")
            return got

        with ThreadPoolExecutor(max_workers=min(self.max_parallel_requests, len(slices))) as pool:
            parts = list(pool.map(run, slices))
        return [r for part in parts for r in part]

