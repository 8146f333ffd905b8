"""Distributed == single-process, bit for bit, across N DiT ranks x S steps x both KV policies.

One torchrun world per N runs the whole sweep for that N (start-up paid four times, not 72). Streams are 3
blocks with 1 block of KV history, so every run wraps the rolling cache; one longer run (7 blocks, 2 of history,
S=7 on N=3) checks a deeper wrap with a non-multiple S.
"""

import json

import pytest
import torch

from helpers import load_latents, reference_latents, run_world
from pipeline.schedule import Schedule

POLICIES = ("per_step", "broadcast")
BASE = dict(num_blocks=3, frames_per_block=2, size="64*64", kv_cache_blocks=1, base_seed=7)
LONG = dict(num_gpus_dit=3, sample_steps=7, num_blocks=7, frames_per_block=2, size="64*64", kv_cache_blocks=2,
            base_seed=11)
STALE = dict(num_gpus_dit=2, sample_steps=4, kv_sync="unsynced", **BASE)


def sweep_configs(n):
    configs = [dict(name=f"n{n}-s{s}-{p}", num_gpus_dit=n, sample_steps=s, kv_sync=p, **BASE)
               for s in range(1, 10) for p in POLICIES]
    if n == 3:
        configs += [dict(name=f"long-{p}", kv_sync=p, **LONG) for p in POLICIES]
    if n == 2:
        configs += [dict(name="stale", **STALE)]
    if n in UPSTREAM_STEPS:
        configs += [dict(name=f"upstream-n{n}-{p}", kv_sync=p, **upstream_cfg(n)) for p in POLICIES]
        configs += [dict(name=f"sink-n{n}-{p}-{m}", kv_sync=p, **sink_cfg(n, m)) for p in POLICIES for m in MODELS]
    return configs


MODELS = ("wan", "upstream_standin")


def sink_cfg(n, model):
    return dict(model=model, num_gpus_dit=n, sample_steps=UPSTREAM_STEPS[n], sink_refresh_block=2,
                **{**BASE, "num_blocks": 4})


UPSTREAM_STEPS = {2: 5, 3: 7}  # S > N, not a multiple


def upstream_cfg(n):
    return dict(model="upstream_standin", num_gpus_dit=n, sample_steps=UPSTREAM_STEPS[n], **BASE)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    for n in (1, 2, 3, 4):
        run_world(n + 1, sweep_configs(n), out)
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("steps", range(1, 10))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_distributed_equals_reference(sweep, n, steps, policy):
    got = load_latents(sweep / f"n{n}-s{steps}-{policy}.pt")
    want = reference_latents(num_gpus_dit=n, sample_steps=steps, kv_sync=policy, **BASE)
    assert got.shape == want.shape == (4, 3 * 2, 8, 8)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("policy", POLICIES)
def test_long_stream_past_cache_capacity(sweep, policy):
    got = load_latents(sweep / f"long-{policy}.pt")
    assert torch.equal(got, reference_latents(kv_sync=policy, **LONG))


def test_policies_differ():
    """The two semantics are really different computations (S > 1), so equality above is not vacuous."""
    per_step = reference_latents(num_gpus_dit=2, sample_steps=4, kv_sync="per_step", **BASE)
    broadcast = reference_latents(num_gpus_dit=2, sample_steps=4, kv_sync="broadcast", **BASE)
    f = BASE["frames_per_block"]
    assert torch.equal(per_step[:, :f], broadcast[:, :f])  # block 0 only sees the sink: identical
    assert not torch.equal(per_step[:, f:], broadcast[:, f:])  # later blocks read different history


def test_stale_cache_differs_from_both(sweep):
    """The proposal without its sync (each rank keeps its own cache) matches its own single-process model and
    neither correct semantics: a rank that misses the sync produces different video."""
    got = load_latents(sweep / "stale.pt")
    assert torch.equal(got, reference_latents(**STALE))
    for policy in POLICIES:
        correct = reference_latents(**{**STALE, "kv_sync": policy})
        assert not torch.equal(got, correct), policy


def test_history_is_read():
    """A longer KV history changes later blocks: attention reads the cache (and evicts from it)."""
    short = reference_latents(num_gpus_dit=2, sample_steps=2, kv_sync="per_step", **{**BASE, "num_blocks": 4})
    long = reference_latents(num_gpus_dit=2, sample_steps=2, kv_sync="per_step",
                             **{**BASE, "num_blocks": 4, "kv_cache_blocks": 3})
    f = BASE["frames_per_block"]
    assert torch.equal(short[:, : 2 * f], long[:, : 2 * f])  # blocks 0, 1: same visible history
    assert not torch.equal(short[:, 2 * f:], long[:, 2 * f:])  # block 2 on: block 0 evicted in one, not the other


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_runtime_ran_exactly_the_schedule(sweep, n):
    """Every DiT rank executed its list action for action; the VAE rank received and decoded in block order."""
    for steps in range(1, 10):
        for policy in POLICIES:
            stats = json.loads((sweep / f"n{n}-s{steps}-{policy}.json").read_text())
            lists = Schedule(n, steps, BASE["num_blocks"], policy).rank_lists()
            for rank in range(n):
                ran = [tuple(row[:4]) for row in stats["timelines"][str(rank)]]
                assert ran == [(a.kind, a.block, a.step, a.peer) for a in lists[rank]], (steps, policy, rank)
            vae = stats["timelines"][str(n)]
            assert [r[1] for r in vae if r[0] == "decode"] == list(range(BASE["num_blocks"]))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", sorted(UPSTREAM_STEPS))
def test_upstream_convention_adapter_equals_reference(sweep, n, policy):
    """A model with the upstream calling convention and cache layout (list of per-layer dicts), through the
    adapter: bit-identical to its single-process run, and its cache really is read (policies differ)."""
    got = load_latents(sweep / f"upstream-n{n}-{policy}.pt")
    assert torch.equal(got, reference_latents(kv_sync=policy, **upstream_cfg(n)))
    other = "broadcast" if policy == "per_step" else "per_step"
    assert not torch.equal(got, reference_latents(kv_sync=other, **upstream_cfg(n)))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", sorted(UPSTREAM_STEPS))
def test_rolling_sink_refresh_equals_reference(sweep, n, policy, model):
    """From block 2 on every cache's sink is block 0's last latent frame, sent by the VAE rank point to point and
    re-prefilled per cache at the block boundary: bit-identical to the reference, and it changes the video."""
    got = load_latents(sweep / f"sink-n{n}-{policy}-{model}.pt")
    cfg = sink_cfg(n, model)
    assert torch.equal(got, reference_latents(kv_sync=policy, **cfg))
    unrefreshed = reference_latents(kv_sync=policy, **{**cfg, "sink_refresh_block": 0})
    f = BASE["frames_per_block"]
    assert torch.equal(got[:, : 2 * f], unrefreshed[:, : 2 * f])
    assert not torch.equal(got[:, 2 * f:], unrefreshed[:, 2 * f:])
