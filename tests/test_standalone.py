"""kv_sync.py and scheduler_utils.py work on their own: no launcher, no model, no process group."""

import subprocess
import sys
import textwrap

from helpers import ROOT

SNIPPET = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import kv_sync, scheduler_utils

    assert not dist.is_initialized()
    assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "pulled in the launcher"

    # scheduler_utils: step i from its index alone
    table = scheduler_utils.StepTable.from_scheduler(num_steps=6, shift=5.0)
    x = torch.ones(4, 2, 8, 8)
    assert table.step(3, x, torch.zeros_like(x)).equal(x) and table.timestep(0).shape == (1,)

    # kv_sync policy answers
    assert kv_sync.caches_on_rank("per_step", 1, 6, 4) == [1, 5]
    assert kv_sync.caches_on_rank("broadcast", 1, 6, 4) == [0]
    assert kv_sync.sync_ranks("broadcast", 3, 4) == [0, 1, 2]
    assert kv_sync.kv_bytes_per_block("per_step", 8, 4, 1000) == 0
    assert kv_sync.kv_bytes_per_block("broadcast", 8, 4, 1000) == 8 * 3 * 1000

    # pack/unpack on the upstream layout: list of per-layer dicts, k/v [batch, tokens, heads, head_dim]
    layers = [dict(k=torch.randn(1, 12, 2, 4), v=torch.randn(1, 12, 2, 4), cond_k=torch.zeros(1, 3, 2, 4),
                   cond_v=torch.zeros(1, 3, 2, 4), cond_end=3) for _ in range(3)]
    buf = kv_sync.pack_slot(layers, 4, 8)
    assert buf.shape == (3 * 2 * 1 * 4 * 2 * 4,)
    other = [dict(k=torch.zeros(1, 12, 2, 4), v=torch.zeros(1, 12, 2, 4)) for _ in range(3)]
    kv_sync.unpack_slot(other, 4, 8, buf)
    for a, b in zip(layers, other):
        assert a["k"][:, 4:8].equal(b["k"][:, 4:8]) and a["v"][:, 4:8].equal(b["v"][:, 4:8])
        assert b["k"][:, :4].abs().sum() == 0 and b["k"][:, 8:].abs().sum() == 0

    # ... and on a [layers, 2, tokens, heads, head_dim] tensor cache
    class Flat:
        def __init__(self):
            self.data = torch.randn(3, 2, 12, 2, 4)
    a, b = Flat(), Flat()
    kv_sync.unpack_slot(b, 2, 5, kv_sync.pack_slot(a, 2, 5))
    assert a.data[:, :, 2:5].equal(b.data[:, :, 2:5]) and not a.data[:, :, 5:].equal(b.data[:, :, 5:])
    print("standalone ok")
''')


def test_kv_sync_and_scheduler_utils_stand_alone(tmp_path):
    # Run from an empty directory with only the two modules on the path: nothing else of ours is importable.
    for name in ("kv_sync.py", "scheduler_utils.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    proc = subprocess.run([sys.executable, "-c", SNIPPET], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "standalone ok" in proc.stdout
