"""The same generation across two torchrun agents acting as two nodes (c10d rendezvous on 127.0.0.1)."""

import socket
import subprocess

import torch

from helpers import ROOT, env, load_latents, reference_latents, torchrun_cmd

CFG = dict(num_gpus_dit=3, sample_steps=5, num_blocks=4, size="64*64", frames_per_block=2, kv_cache_blocks=1,
           base_seed=9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_reference(tmp_path):
    rdzv = f"127.0.0.1:{free_port()}"
    args = ["--num_gpus_dit", "3", "--sample_steps", "5", "--num_blocks", "4", "--size", "64*64",
            "--frames_per_block", "2", "--kv_cache_blocks", "1", "--base_seed", "9", "--kv_sync", "broadcast",
            "--save_latents", str(tmp_path / "lat.pt")]
    procs = [
        subprocess.Popen(torchrun_cmd(2, "infer_multigpu.py", *args, nnodes=2, node_rank=node, rdzv=rdzv),
                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    got = load_latents(tmp_path / "lat.pt")
    assert torch.equal(got, reference_latents(kv_sync="broadcast", **CFG))
