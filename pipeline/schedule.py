"""The pipeline schedule as plain data: each rank's ordered list of actions.

Like ``torch.distributed.pipelining``'s schedules, the runtime does nothing but follow the list, a simulator
replays it under a cost model (``pipeline.simulator``), and it dumps as a Chrome trace. Step ``i`` always runs on
DiT rank ``i % N`` (``ScheduleLoopedBFS``'s "stage i on rank i % N"); what the schedule decides is the *order*.

Actions (``Action.block``/``Action.step`` name the latent the action is about):
    compute(b, i)        run denoising step ``i`` of block ``b`` (input: noise if ``i == 0``, else recv(b, i-1))
    send(b, i, peer)     isend the output of step ``i`` to ``peer`` (the next step's rank, or the VAE rank)
    recv(b, i, peer)     post an irecv for the output of step ``i`` from ``peer`` (never blocks)
    sync(b, i, peer)     the KV broadcast after step ``i`` of block ``b``, rooted at ``peer`` (``broadcast`` policy)
    decode(b)            VAE rank: wait for recv(b, S-1) and emit the block
    send/recv(0, SINK)   rolling sink: the VAE rank sends block 0's last latent frame to each DiT rank
    refresh(R, k)        re-prefill cache ``k`` with that frame, just before its first step of a block >= R

Why the lists cannot deadlock. Sends and receive posts never block; a compute waits only for a message whose
send comes earlier in some rank's list; collectives appear in the same global order on every rank of the sync
group. The lists are cut from one unit-time execution of the dependency graph, so every wait is for an action
that the execution already ran: by induction, every rank always has something that can finish. Receives from
one peer are posted in the order that peer sends them, so NCCL's in-order matching (it has no tags) pairs
each message with its intended receive. ``pipeline.simulator`` checks all of this for any list.

Dependencies: (b, i) needs (b, i-1) (its latent) and every (b-1, j) that wrote the cache (b, i) reads
(``kv_sync.cache_key``): under ``per_step`` that is (b-1, i) only, under ``broadcast`` all of block b-1.

Orders:
    looped     list scheduling: each idle rank runs its ready step of the earliest block. Steady state keeps
               every rank busy when N divides S; otherwise the busiest rank (ceil(S/N) steps) sets the pace.
    blockwise  the proposal's loop: rank r runs its steps of block b, then of block b+1; ranks idle while a
               block laps the ring.

The generator is lazy, so ``num_blocks=None`` (an endless stream) works; ``max_inflight`` bounds how many blocks
are between their first step and their decode.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import kv_sync

ORDERS = ("looped", "blockwise")
SINK = -1  # Action.step of the rolling-sink message (VAE -> DiT ranks)


@dataclass(frozen=True)
class Action:
    kind: str  # compute | send | recv | sync | decode
    block: int
    step: int
    peer: int = -1

    def __str__(self) -> str:
        peer = f"@{self.peer}" if self.peer >= 0 else ""
        return f"{self.kind}(b{self.block},s{self.step}){peer}"


class Schedule:
    def __init__(
        self,
        num_dit: int,
        num_steps: int,
        num_blocks: int | None,
        policy: str = "per_step",
        order: str = "looped",
        max_inflight: int | None = None,
        sink_refresh_block: int = 0,
    ):
        kv_sync.check_policy(policy)
        if order not in ORDERS:
            raise ValueError(f"unknown schedule order {order!r}; choose one of {', '.join(ORDERS)}")
        if num_dit < 1 or num_steps < 1 or (num_blocks is not None and num_blocks < 1):
            raise ValueError("num_dit, num_steps and num_blocks must be >= 1")
        self.num_dit, self.num_steps, self.num_blocks = num_dit, num_steps, num_blocks
        self.policy, self.order = policy, order
        self.vae_rank = num_dit
        # Rolling sink: from block R on, caches hold a sink taken from block 0's output (0 = never).
        self.sink_refresh_block = sink_refresh_block
        self.refreshes = sink_refresh_block > 0 and (num_blocks is None or sink_refresh_block < num_blocks)
        self.sync_group = kv_sync.sync_ranks(policy, num_steps, num_dit)
        if len(self.sync_group) < 2:
            self.sync_group = []  # nothing to keep coherent with a single replica
        # Enough blocks in flight to fill the ring (one per active rank) plus one being handed over.
        self.max_inflight = max_inflight or (min(num_dit, num_steps) + 1)
        self._keys = [kv_sync.cache_key(policy, i, num_dit) for i in range(num_steps)]
        # (b, i) waits for (b-1, j) for each j here: the steps that write the cache step i reads.
        self._writers = [[j for j in range(num_steps) if self._keys[j] == self._keys[i]] for i in range(num_steps)]

    @property
    def world_size(self) -> int:
        return self.num_dit + 1

    def owner(self, step: int) -> int:
        return kv_sync.owner_of_step(step, self.num_dit)

    def steps_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_steps, self.num_dit)) if rank < self.num_dit else []

    # -- generation ---------------------------------------------------------------------------------------------
    def events(self) -> Iterator[tuple[int, int, Action]]:
        """All ranks' actions as ``(unit_time, rank, action)`` in the order each rank must run them."""
        N, S = self.num_dit, self.num_steps
        progress: dict[int, int] = {}  # block -> steps done, for blocks admitted and not yet retired
        finished_upto = 0  # blocks [0, finished_upto) are decoded
        admitted = 0
        running: list[tuple[int, int] | None] = [None] * N
        cursor = [0] * N  # blockwise: index into rank's fixed sequence
        total = self.num_blocks

        refreshed = [set() for _ in range(N)]  # rank -> cache keys already holding the new sink

        def deps_done(b: int, i: int) -> bool:
            if progress.get(b, 0) != i:
                return False
            if self.refreshes and b >= self.sink_refresh_block and finished_upto < 1:
                return False  # the new sink comes from block 0
            if b == 0 or (b - 1) not in progress:
                return True  # no block before, or block b-1 finished and retired
            done_prev = progress[b - 1]
            return all(done_prev > j for j in self._writers[i])

        for t in itertools.count():
            # 1) completions of the steps started at t-1: hand the latent on, keep the caches coherent.
            for r in range(N):
                if running[r] is None:
                    continue
                b, i = running[r]
                running[r] = None
                progress[b] = i + 1
                dst = self.owner(i + 1) if i + 1 < S else self.vae_rank
                yield t, r, Action("send", b, i, dst)
                yield t, dst, Action("recv", b, i, r)
                if self.sync_group:
                    for g in self.sync_group:
                        yield t, g, Action("sync", b, i, r)
                if i + 1 == S:
                    yield t, self.vae_rank, Action("decode", b, i)
                    if b == 0 and self.refreshes:
                        # Point to point, VAE -> each DiT rank holding caches: no collective to mismatch.
                        for g in range(min(N, S)):
                            yield t, self.vae_rank, Action("send", 0, SINK, g)
                            yield t, g, Action("recv", 0, SINK, self.vae_rank)
            while finished_upto in progress and progress[finished_upto] == S:
                if finished_upto - 1 in progress:
                    del progress[finished_upto - 1]
                finished_upto += 1
            if total is not None and finished_upto >= total:
                return
            # 2) admit new blocks up to the in-flight bound.
            while (total is None or admitted < total) and admitted < finished_upto + self.max_inflight:
                progress[admitted] = 0
                admitted += 1
            # 3) each idle rank starts one step.
            for r in range(N):
                task = self._pick(r, progress, deps_done, cursor)
                if task is not None:
                    running[r] = task
                    key = self._keys[task[1]]
                    if self.refreshes and task[0] >= self.sink_refresh_block and key not in refreshed[r]:
                        refreshed[r].add(key)
                        yield t, r, Action("refresh", self.sink_refresh_block, key)
                    yield t, r, Action("compute", task[0], task[1])

    def _pick(self, rank, progress, deps_done, cursor):
        steps = self.steps_of(rank)
        if not steps:
            return None
        if self.order == "blockwise":
            k = cursor[rank]
            b, i = divmod(k, len(steps))
            task = (b, steps[i])
            if b in progress and deps_done(*task):
                cursor[rank] += 1
                return task
            return None
        for b in sorted(progress):  # earliest block first
            for i in steps:
                if deps_done(b, i):
                    return (b, i)
        return None

    def actions(self, rank: int) -> Iterator[Action]:
        """Rank ``rank``'s ordered actions (lazy: endless for an endless stream)."""
        for _, r, action in self.events():
            if r == rank:
                yield action

    def rank_lists(self) -> dict[int, list[Action]]:
        """Every rank's full list (finite streams only)."""
        if self.num_blocks is None:
            raise ValueError("an endless stream has no finite lists; use actions(rank)")
        lists: dict[int, list[Action]] = {r: [] for r in range(self.world_size)}
        for _, r, action in self.events():
            lists[r].append(action)
        return lists

    def describe(self) -> str:
        return (
            f"{self.order} schedule, {self.policy}: {self.num_steps} steps on {self.num_dit} DiT ranks "
            f"(rank r runs steps r, r+{self.num_dit}, ...), VAE on rank {self.vae_rank}"
        )
