"""The schedule as data, checked by the simulator: deadlock freedom, NCCL-safe ordering, occupancy."""

import itertools
import math

import pytest

from helpers import ROOT  # noqa: F401
from pipeline.schedule import Action, Schedule
from pipeline.simulator import CostModel, ideal_makespan, simulate

POLICIES = ("per_step", "broadcast")


def sim(sched, rendezvous=True, cost=None):
    return simulate(sched.rank_lists(), sched.num_dit, sched.num_steps, sched.policy, cost or CostModel(),
                    sched.sync_group, rendezvous=rendezvous)


@pytest.mark.parametrize("n", range(1, 17))
def test_no_deadlock_grid(n):
    """Every N <= 16, S <= 32, B <= 12, both policies, under the strictest transport (every send and receive a
    rendezvous in list order, as on one NCCL stream): completes, messages pair up, caches are in place."""
    for steps, blocks, policy in itertools.product(range(1, 33), range(1, 13), POLICIES):
        res = sim(Schedule(n, steps, blocks, policy))
        assert res.ok, f"N={n} S={steps} B={blocks} {policy}: {res.error}"
        assert sorted(res.block_done) == list(range(blocks))


@pytest.mark.parametrize("n,steps", [(1, 3), (2, 4), (3, 7), (4, 6), (4, 8), (5, 3)])
def test_blockwise_order_is_also_valid(n, steps):
    for policy in POLICIES:
        assert sim(Schedule(n, steps, 6, policy, order="blockwise")).ok


def test_looped_beats_blockwise_as_in_the_issue():
    assert ideal_makespan(4, 8, 16) == 35
    assert sim(Schedule(4, 8, 16, "per_step", "blockwise")).makespan == 83


@pytest.mark.parametrize("n,steps", [(2, 4), (4, 4), (4, 8), (3, 9), (4, 16), (2, 2)])
def test_per_step_steady_state_every_rank_busy_when_n_divides_s(n, steps):
    blocks = 12
    res = sim(Schedule(n, steps, blocks, "per_step"))
    busy = {(r, int(start)) for r, a, start, _ in res.timeline if a.kind == "compute"}
    fill = steps  # the first block needs S step-times to reach the last rank
    for t in range(fill, int(res.makespan) - fill):
        for r in range(n):
            assert (r, t) in busy, f"rank {r} idle at t={t}"
    assert res.makespan == (steps // n) * blocks + n - 1


@pytest.mark.parametrize("n,steps,blocks", [(4, 6, 16), (3, 7, 12), (4, 5, 10), (3, 4, 9)])
def test_per_step_busiest_rank_sets_the_pace_when_n_does_not_divide_s(n, steps, blocks):
    res = sim(Schedule(n, steps, blocks, "per_step"))
    per_block = math.ceil(steps / n)  # rank 0 owns this many steps of every block
    assert res.makespan <= per_block * blocks + steps
    assert res.occupancy(0) >= per_block * blocks / res.makespan - 1e-9


@pytest.mark.parametrize("n,steps", [(2, 4), (4, 8), (3, 7)])
def test_broadcast_is_serial_by_nature(n, steps):
    res = sim(Schedule(n, steps, 5, "broadcast"))
    assert res.makespan == steps * 5  # block b+1 needs block b's last step, synced everywhere


def test_earliest_block_first_and_in_order_completion():
    res = sim(Schedule(4, 8, 16, "per_step"))
    done = [res.block_done[b] for b in range(16)]
    assert done == sorted(done)
    assert (done[15] - done[7]) / 8 == 2  # steady state: a block every ceil(S/N) step-times


def test_endless_stream_is_lazy_and_matches_a_long_finite_prefix():
    endless = Schedule(4, 8, None, "per_step")
    finite = Schedule(4, 8, 1000, "per_step")
    for rank in range(5):
        head = list(itertools.islice(endless.actions(rank), 500))
        assert head == list(itertools.islice(finite.actions(rank), 500))
    with pytest.raises(ValueError):
        endless.rank_lists()


def test_max_inflight_bounds_blocks_in_flight():
    """The unit-time execution the lists are cut from never has more than ``max_inflight`` blocks started and
    not finished; the fixed list order then bounds how far any rank can run ahead at run time."""
    sched = Schedule(4, 8, 20, "per_step", max_inflight=2)
    finished = 0
    for t, _, a in sched.events():
        if a.kind == "decode":
            finished += 1
        elif a.kind == "compute":
            assert a.block < finished + 2, (t, a)
    assert finished == 20 and sim(sched).ok


# ---- the simulator catches broken lists (so passing the grid means something)
def _lists(n=2, steps=4, blocks=3, policy="per_step"):
    s = Schedule(n, steps, blocks, policy)
    return s, s.rank_lists()


def test_simulator_detects_out_of_order_receive():
    s, lists = _lists()
    recvs = [i for i, a in enumerate(lists[1]) if a.kind == "recv"]
    lists[1][recvs[0]], lists[1][recvs[1]] = lists[1][recvs[1]], lists[1][recvs[0]]
    res = simulate(lists, 2, 4, "per_step")
    assert not res.ok and "posted recv" in res.error


def test_simulator_detects_deadlock():
    s, lists = _lists()
    # rank 1 receives its first input only after its last compute: nothing can feed that compute
    first = next(i for i, a in enumerate(lists[1]) if a.kind == "recv")
    lists[1].append(lists[1].pop(first))
    res = simulate(lists, 2, 4, "per_step")
    assert not res.ok and "deadlock" in res.error


def test_simulator_detects_stale_cache_order():
    s, lists = _lists(n=1, steps=2, blocks=2)
    computes = [i for i, a in enumerate(lists[0]) if a.kind == "compute"]
    # run (b1, s0) before (b0, s0) -> its history is not in cache 0 yet
    i, j = computes[0], next(k for k in computes if lists[0][k].block == 1 and lists[0][k].step == 0)
    lists[0][i], lists[0][j] = lists[0][j], lists[0][i]
    res = simulate(lists, 1, 2, "per_step")
    assert not res.ok


def test_simulator_detects_mismatched_collectives():
    s, lists = _lists(n=2, steps=4, policy="broadcast")
    syncs = [i for i, a in enumerate(lists[1]) if a.kind == "sync"]
    lists[1][syncs[0]] = Action("sync", 0, 1, 1)
    res = simulate(lists, 2, 4, "broadcast", sync_group=s.sync_group)
    assert not res.ok and ("mismatched" in res.error or "before rank" in res.error)


@pytest.mark.parametrize("n", range(1, 7))
def test_rolling_sink_refresh_lists_are_valid(n):
    """The VAE rank's sink messages and each cache's refresh: no deadlock, no compute of a block >= R with the
    old sink, under the strictest transport, both orders and policies."""
    for steps, blocks, refresh in itertools.product(range(1, 11), range(1, 7), (1, 2, 3)):
        for policy in POLICIES:
            for order in ("looped", "blockwise"):
                s = Schedule(n, steps, blocks, policy, order, sink_refresh_block=refresh)
                res = simulate(s.rank_lists(), n, steps, policy, CostModel(), s.sync_group, rendezvous=True,
                               sink_refresh_block=refresh)
                assert res.ok, f"N={n} S={steps} B={blocks} R={refresh} {policy} {order}: {res.error}"
                refreshes = sum(a.kind == "refresh" for lst in s.rank_lists().values() for a in lst)
                expected = 0 if refresh >= blocks else len(kv_sync_keys(policy, n, steps))
                assert refreshes == expected


def kv_sync_keys(policy, n, steps):
    import kv_sync

    return [(r, k) for r in range(min(n, steps)) for k in kv_sync.caches_on_rank(policy, r, steps, n)]


def test_simulator_detects_a_missing_refresh():
    s = Schedule(2, 4, 4, "per_step", sink_refresh_block=2)
    lists = s.rank_lists()
    lists[0] = [a for a in lists[0] if not (a.kind == "refresh" and a.step == 2)]
    res = simulate(lists, 2, 4, "per_step", sink_refresh_block=2)
    assert not res.ok and "old sink" in res.error


def test_simulated_schedule_dumps_as_chrome_trace(tmp_path):
    import json

    from pipeline.trace import sim_timelines, write_chrome_trace

    res = sim(Schedule(4, 8, 3, "per_step"))
    path = tmp_path / "sim.json"
    write_chrome_trace(sim_timelines(res, unit_seconds=0.05), str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X" and e["cat"] == "compute"]
    assert len(events) == 8 * 3 and {e["tid"] for e in events} == {0, 1, 2, 3}
    assert max(e["ts"] + e["dur"] for e in events) == pytest.approx(res.makespan * 0.05 * 1e6)
