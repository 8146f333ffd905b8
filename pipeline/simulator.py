"""Replay per-rank action lists under a cost model: deadlocks, mismatches, makespan, occupancy.

The simulator knows nothing about how the lists were made. It executes them as the runtime would: receive posts
and sends never block, a compute or decode waits for its message (send time + transfer cost), a ``sync`` waits
until every rank of the group reaches the *same* sync, and every compute checks that the KV history it reads
was written (or broadcast to) on its own rank. It reports the first error it meets, or a deadlock naming what
each stuck rank waits for.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import kv_sync

from .schedule import SINK, Action


@dataclass
class CostModel:
    step: float = 1.0  # one DiT forward + scheduler step
    transfer: float = 0.0  # one latent over the ring
    sync: float = 0.0  # one KV broadcast
    decode: float = 0.0  # VAE decode of one block


@dataclass
class SimResult:
    makespan: float = 0.0
    busy: dict[int, float] = field(default_factory=dict)
    timeline: list[tuple[int, Action, float, float]] = field(default_factory=list)
    error: str | None = None
    block_done: dict[int, float] = field(default_factory=dict)
    seq: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def occupancy(self, rank: int) -> float:
        return self.busy.get(rank, 0.0) / self.makespan if self.makespan else 0.0


def simulate(
    lists: dict[int, list[Action]],
    num_dit: int,
    num_steps: int,
    policy: str,
    cost: CostModel | None = None,
    sync_group: list[int] | None = None,
    rendezvous: bool = False,
    sink_refresh_block: int = 0,
) -> SimResult:
    """Run ``lists`` (rank -> actions). ``rendezvous=True`` is the strictest transport: every send and receive
    post blocks its rank until the peer reaches the matching operation, as when all of a rank's point-to-point
    operations share one NCCL stream. Lists that pass in that mode pass with any buffering."""
    cost = cost or CostModel()
    S = num_steps
    keys = [kv_sync.cache_key(policy, i, num_dit) for i in range(S)]
    writers = {i: [j for j in range(S) if keys[j] == keys[i]] for i in range(S)}
    res = SimResult(busy={r: 0.0 for r in lists})
    clock = {r: 0.0 for r in lists}
    pos = {r: 0 for r in lists}
    sent: dict[tuple[int, int], deque] = defaultdict(deque)  # (src, dst) -> [(block, step, arrival)]
    posted: dict[tuple[int, int], deque] = defaultdict(deque)  # (src, dst) -> [(block, step)] not yet matched
    arrived: dict[int, dict[tuple[int, int], float]] = defaultdict(dict)  # rank -> message -> arrival time
    has_kv: dict[int, set] = defaultdict(set)  # rank -> {(block, step)} whose cache writes it holds
    group = sorted(sync_group or [])
    sink_arrival: dict[int, dict] = defaultdict(dict)  # rank -> the rolling-sink message, once received
    refreshed: dict[int, set] = defaultdict(set)  # rank -> cache keys holding the new sink
    sends_issued: dict[tuple[int, int], int] = defaultdict(int)  # channel -> sends so far
    recvs_posted: dict[tuple[int, int], int] = defaultdict(int)  # channel -> receive posts so far
    registered: dict[int, int] = {}  # rank -> position whose p2p op is registered but not yet released

    def match(src, dst):
        # Messages on one channel pair up in order (NCCL semantics): the k-th send with the k-th posted receive.
        while sent[(src, dst)] and posted[(src, dst)]:
            b, i, t = sent[(src, dst)].popleft()
            pb, pi = posted[(src, dst)].popleft()
            if (b, i) != (pb, pi):
                raise _SimError(
                    f"rank {dst} posted recv(b{pb},s{pi}) from rank {src}, which sends (b{b},s{i}) first"
                )
            arrived[dst][(b, i)] = t

    def step_one(r) -> bool:
        a = lists[r][pos[r]]
        now = clock[r]
        if a.kind in ("recv", "send"):
            chan = (a.peer, r) if a.kind == "recv" else (r, a.peer)
            if registered.get(r) != pos[r]:
                registered[r] = pos[r]
                if a.kind == "recv":
                    posted[chan].append((a.block, a.step))
                    recvs_posted[chan] += 1
                    mine = recvs_posted[chan]
                else:
                    sent[chan].append((a.block, a.step, now + cost.transfer))
                    sends_issued[chan] += 1
                    mine = sends_issued[chan]
                match(*chan)
                res.seq[(r, pos[r])] = mine
            if rendezvous and a.peer != r:
                partner = sends_issued[chan] if a.kind == "recv" else recvs_posted[chan]
                if partner < res.seq[(r, pos[r])]:
                    return False  # blocked until the peer reaches the matching operation
        elif a.kind == "refresh":
            if (0, SINK) not in sink_arrival[r]:
                if (0, SINK) not in arrived[r]:
                    return False
                sink_arrival[r][(0, SINK)] = arrived[r].pop((0, SINK))
            start = max(now, sink_arrival[r][(0, SINK)])
            refreshed[r].add(a.step)
            res.timeline.append((r, a, start, start + cost.step))
            res.busy[r] += cost.step
            clock[r] = start + cost.step
        elif a.kind in ("compute", "decode"):
            msg = (a.block, a.step - 1) if a.kind == "compute" else (a.block, a.step)
            start = now
            if a.kind == "decode" or a.step > 0:
                if msg not in arrived[r]:
                    return False
                start = max(now, arrived[r].pop(msg))
            if a.kind == "compute":
                if sink_refresh_block and a.block >= sink_refresh_block and keys[a.step] not in refreshed[r]:
                    raise _SimError(f"rank {r} runs {a} with the old sink in cache {keys[a.step]}")
                if a.block > 0:
                    missing = [j for j in writers[a.step] if (a.block - 1, j) not in has_kv[r]]
                    if missing:
                        raise _SimError(
                            f"rank {r} runs {a} before its cache holds block {a.block - 1} step {missing[0]}"
                        )
                has_kv[r].add((a.block, a.step))
                dur = cost.step
            else:
                dur = cost.decode
                res.block_done[a.block] = start + dur
            res.timeline.append((r, a, start, start + dur))
            res.busy[r] += dur
            clock[r] = start + dur
        elif a.kind == "sync":
            heads = {g: lists[g][pos[g]] if pos[g] < len(lists[g]) else None for g in group}
            if r not in heads:
                raise _SimError(f"rank {r} is not in the sync group {group} but has {a}")
            if any(h is None or h.kind != "sync" for h in heads.values()):
                return False
            if any((h.block, h.step, h.peer) != (a.block, a.step, a.peer) for h in heads.values()):
                raise _SimError("mismatched collectives: " + ", ".join(f"rank {g}: {h}" for g, h in heads.items()))
            if (a.block, a.step) not in has_kv[a.peer]:
                raise _SimError(f"sync {a} before rank {a.peer} computed it")
            start = max(clock[g] for g in group)
            for g in group:
                res.timeline.append((g, lists[g][pos[g]], start, start + cost.sync))
                clock[g] = start + cost.sync
                has_kv[g].add((a.block, a.step))
                if g != r:
                    pos[g] += 1
        else:
            raise _SimError(f"unknown action {a}")
        pos[r] += 1
        return True

    try:
        while True:
            progressed = False
            for r in lists:
                while pos[r] < len(lists[r]) and step_one(r):
                    progressed = True
            if all(pos[r] == len(lists[r]) for r in lists):
                break
            if not progressed:
                stuck = [f"rank {r} at {lists[r][pos[r]]}" for r in lists if pos[r] < len(lists[r])]
                raise _SimError("deadlock: " + "; ".join(stuck))
    except _SimError as e:
        res.error = str(e)
    leftovers = [k for k, q in sent.items() if q] + [k for k, q in posted.items() if q]
    if res.error is None and leftovers:
        res.error = f"unmatched messages on channels {sorted(set(leftovers))}"
    res.makespan = max(clock.values(), default=0.0)
    return res


class _SimError(Exception):
    pass


def ideal_makespan(num_dit: int, num_steps: int, num_blocks: int, policy: str = "per_step") -> int:
    """Unit-step, zero-transfer makespan of the looped schedule, in step-times."""
    from .schedule import Schedule

    sched = Schedule(num_dit, num_steps, num_blocks, policy, "looped")
    return int(simulate(sched.rank_lists(), num_dit, num_steps, policy, CostModel(), sched.sync_group).makespan)
