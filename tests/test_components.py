"""The pieces against diffusers' own behaviour: scheduler stepping, RoPE, the block-causal processor, the VAE."""

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from helpers import ROOT  # noqa: F401  (puts the project on sys.path)
from pipeline.kv_cache import KVCache
from pipeline.protocol import slot_for
from pipeline.vae import StreamingDecoder, build_vae, to_uint8_frames
from pipeline.wan_dit import TINY_TRANSFORMER_CONFIG, WanBlockCausalDiT, build_transformer, seeded_context
from scheduler_utils import StepTable, make_scheduler


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (4, 5.0), (8, 3.0), (9, 1.0)])
def test_step_at_index_matches_sequential_diffusers(steps, shift):
    sched = make_scheduler(shift)
    sched.set_timesteps(steps)
    table = StepTable.from_scheduler(steps, shift)
    assert torch.equal(table.timesteps, sched.timesteps)
    g = torch.Generator().manual_seed(0)
    x_seq = torch.randn(4, 3, 8, 8, generator=g)
    x_idx = x_seq.clone()
    velocities = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(steps)]
    for i, t in enumerate(sched.timesteps):
        x_seq = sched.step(velocities[i], t, x_seq).prev_sample
    # Out of order and from fresh tables, as different ranks would: each step depends only on its index.
    for i in range(steps):
        x_idx = StepTable.from_scheduler(steps, shift).step(i, x_idx, velocities[i])
        assert torch.equal(table.timestep(i), sched.timesteps[i : i + 1])
    assert torch.equal(x_seq, x_idx)


def test_step_index_out_of_range():
    with pytest.raises(IndexError):
        StepTable.from_scheduler(4).step(4, torch.zeros(1), torch.zeros(1))


def _fresh_model():
    return build_transformer(None, seed=3)


def test_rope_offset_zero_is_stock_and_far_positions_are_computed():
    model = _fresh_model()
    stock = model.rope
    x = torch.zeros(1, 4, 3, 8, 8)
    expect = stock(x)
    dit = WanBlockCausalDiT(model, 3, (8, 8))
    got = model.rope(x)
    assert all(torch.equal(a, b) for a, b in zip(expect, got))
    # Block 10,000 starts at frame 30,001: far beyond the stock table (rope_max_seq_len=1024).
    model.rope.frame_offset = 1 + 10_000 * 3
    cos, sin = model.rope(x)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    # ... and equal to what diffusers' own RoPE helper gives at those positions.
    positions = torch.arange(30_001, 30_004)
    want = get_1d_rotary_pos_embed(model.rope.t_dim, positions, 10000.0, use_real=True, repeat_interleave_real=True,
                                   freqs_dtype=torch.float64)
    got_t = model.rope.temporal(positions)
    assert torch.equal(want[0], got_t[0]) and torch.equal(want[1], got_t[1])
    assert dit.frames_per_block == 3


def test_prefill_equals_stock_forward():
    """With the cache holding only the sink, the block-causal model computes what the stock model computes."""
    stock = _fresh_model()
    dit = WanBlockCausalDiT(_fresh_model(), 1, (8, 8))
    ctx = seeded_context(TINY_TRANSFORMER_CONFIG["text_dim"], 0)
    sink = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cache = dit.new_cache(2)
    expect = stock(hidden_states=sink[None], timestep=torch.zeros(1), encoder_hidden_states=ctx, return_dict=False)
    got = dit._forward(sink, torch.zeros(1), cache, cache.sink_range(), cache.sink_range()[1], 0, ctx)
    assert torch.equal(expect[0][0], got)
    assert cache.data[:, :, : cache.sink_tokens].abs().sum() > 0  # the sink was written


def test_block_writes_its_slot_and_reads_history():
    dit = WanBlockCausalDiT(_fresh_model(), 2, (8, 8))
    ctx = seeded_context(TINY_TRANSFORMER_CONFIG["text_dim"], 0)
    cache = dit.new_cache(1)  # 2 slots: block 2 overwrites block 0's slot
    g = torch.Generator().manual_seed(2)
    dit.prefill(cache, torch.randn(4, 1, 8, 8, generator=g), ctx)
    x = torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([500.0])
    v0 = dit.velocity(x, t, cache, slot_for(cache, 0, 2), ctx)
    slot0 = cache.block_view(0).clone()
    assert slot0.abs().sum() > 0 and cache.block_view(1).abs().sum() == 0
    v1 = dit.velocity(x, t, cache, slot_for(cache, 1, 2), ctx)
    assert not torch.equal(v0, v1)  # same input, different position and history
    dit.velocity(x, t, cache, slot_for(cache, 2, 2), ctx)
    assert cache.block_range(2) == cache.block_range(0) and not torch.equal(cache.block_view(0), slot0)


def test_kv_cache_geometry():
    c = KVCache(2, 3, 4, sink_tokens=5, block_tokens=7, history_blocks=2)
    assert c.data.shape == (2, 2, 5 + 3 * 7, 3, 4)
    assert [c.block_range(b) for b in range(4)] == [(5, 12), (12, 19), (19, 26), (5, 12)]
    assert [c.visible_tokens(b) for b in range(5)] == [12, 19, 26, 26, 26]
    assert c.nbytes_per_block() == 2 * 2 * 7 * 3 * 4 * 4


def test_streaming_decode_equals_one_shot():
    vae = build_vae(None, seed=5)
    z = torch.randn(4, 7, 8, 8, generator=torch.Generator().manual_seed(3))
    one_shot = vae.decode(z[None]).sample[0]
    dec = StreamingDecoder(vae)
    parts = [dec.decode(z[:, :3]), dec.decode(z[:, 3:5]), dec.decode(z[:, 5:])]
    assert [p.shape[1] for p in parts] == [1 + 4 * 2, 4 * 2, 4 * 2]
    assert torch.equal(torch.cat(parts, dim=1), one_shot)
    assert StreamingDecoder.video_frames(7) == one_shot.shape[1] == 25
    frames = to_uint8_frames(one_shot)
    assert frames.shape == (25, 64, 64, 3) and frames.dtype == np.uint8


def test_tiny_transformer_is_a_real_wan_model():
    assert isinstance(_fresh_model(), WanTransformer3DModel)
    assert torch.equal(next(_fresh_model().parameters()), next(_fresh_model().parameters()))  # seeded
