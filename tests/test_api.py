"""The Python API: decoded frame blocks as they are produced, in one process and in a torchrun world."""

import textwrap

import numpy as np
import torch

from helpers import ROOT, load_latents, reference_latents, run_torchrun
from pipeline.api import stream

CFG = dict(num_gpus_dit=2, sample_steps=3, num_blocks=3, size="64*64", frames_per_block=2, kv_cache_blocks=1,
           base_seed=13)


def test_stream_in_one_process_yields_decoded_blocks_in_order():
    blocks = list(stream(**CFG))
    assert [b.index for b in blocks] == [0, 1, 2]
    assert torch.equal(torch.cat([b.latent for b in blocks], dim=1), reference_latents(**CFG))
    assert [b.frames.shape for b in blocks] == [(5, 64, 64, 3), (8, 64, 64, 3), (8, 64, 64, 3)]
    assert all(b.frames.dtype == np.uint8 for b in blocks)
    assert all(b.frames is None for b in stream(decode=False, **CFG))


def test_stream_under_torchrun(tmp_path):
    script = tmp_path / "use_api.py"
    out = tmp_path / "lat.pt"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.api import stream
        got = [(b.index, b.latent, b.frames.shape) for b in stream(**{CFG!r})]
        if got:  # only the VAE rank yields
            assert [g[0] for g in got] == [0, 1, 2], got
            torch.save(torch.cat([g[1] for g in got], dim=1), {str(out)!r})
            print("frames", [g[2][0] for g in got])
    """))
    proc = run_torchrun(3, str(script), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frames [5, 8, 8]" in proc.stdout
    assert torch.equal(load_latents(out), reference_latents(**CFG))
