"""Launch real torchrun worlds from tests and compute single-process references."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.components import load_components  # noqa: E402
from pipeline.config import GenerationConfig  # noqa: E402
from pipeline.reference import reference_blocks  # noqa: E402


def torchrun_cmd(nproc: int, script: str, *args: str, nnodes: int = 1, node_rank: int | None = None,
                 rdzv: str | None = None) -> list[str]:
    """``script`` is a path under the project root, or ``-m module``."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", "--rdzv-id=tpp-test"]
        if node_rank is not None:
            cmd += [f"--node-rank={node_rank}"]
    target = ["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]
    # --shutdown-timeout as scripts/run_torchrun.sh sets it: a stopped rank is SIGKILLed 10 s after the failure
    cmd += [f"--nproc_per_node={nproc}", "--monitor-interval=0.2", "--shutdown-timeout=10", *target, *args]
    return cmd


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("TPP_FAULT", None)
    return e


def run_torchrun(nproc: int, script: str, *args: str, timeout: float = 600, extra_env: dict | None = None,
                 **kw) -> subprocess.CompletedProcess:
    """Run a torchrun world to completion. If it has not ended within ``timeout`` seconds, the whole process
    group (torchrun and every rank, stopped ones included) is killed and ``TimeoutExpired`` raised: the test
    fails instead of hanging."""
    e = env()
    e.update(extra_env or {})
    proc = subprocess.Popen(torchrun_cmd(nproc, script, *args, **kw), cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_world(nproc: int, configs: list[dict], out_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    path = out_dir / f"configs-{nproc}.json"
    path.write_text(json.dumps(configs))
    proc = run_torchrun(nproc, "-m pipeline.sweep_world", str(path), str(out_dir), timeout=timeout)
    assert proc.returncode == 0, f"world of {nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@functools.lru_cache(maxsize=None)
def _reference(key: str) -> torch.Tensor:
    cfg = GenerationConfig(**json.loads(key))
    comps = load_components(cfg, torch.device("cpu"))
    return torch.cat([x for _, x in reference_blocks(cfg, comps)], dim=1)


def reference_latents(**fields) -> torch.Tensor:
    """Single-process latents ``[C, frames, h, w]`` for a config (cached per config)."""
    fields = {k: v for k, v in fields.items() if k not in ("name", "save_latents", "output", "stats_json", "trace")}
    return _reference(json.dumps(fields, sort_keys=True))


def load_latents(path) -> torch.Tensor:
    obj = torch.load(path)
    return obj["latents"] if isinstance(obj, dict) else obj
