"""A torchrun world that runs many generations back to back (start-up paid once per world): test sweeps and
the benchmark use it.

    torchrun --standalone --nproc_per_node=N+1 -m pipeline.sweep_world CONFIGS.json OUT_DIR

CONFIGS.json is a list of ``{"name": ..., ["save": false,] <GenerationConfig fields>}`` all with
``num_gpus_dit == N``. For each, the VAE rank writes ``OUT_DIR/<name>.pt`` (latents, unless ``save`` is false)
and ``OUT_DIR/<name>.json`` (stats incl. per-rank timelines).
"""

import json
import os
import sys

import torch.distributed as dist

from pipeline.config import GenerationConfig, validate
from pipeline.distributed import generate_distributed, init_distributed
from pipeline.messages import error


def main() -> int:
    configs_path, out_dir = sys.argv[1], sys.argv[2]
    with open(configs_path) as f:
        configs = json.load(f)
    world = int(os.environ["WORLD_SIZE"])
    device = None
    for entry in configs:
        name = entry.pop("name")
        save = entry.pop("save", True)  # the benchmark measures latents-only runs without keeping them
        cfg = GenerationConfig(**entry)
        if save:
            cfg.save_latents = os.path.join(out_dir, f"{name}.pt")
        err = validate(cfg, world)
        if err:
            error(err, int(os.environ["RANK"]))
            return 2
        device = device or init_distributed(cfg)
        result = generate_distributed(cfg, device)
        if result.exit_code:
            return result.exit_code
        if result.stats:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(result.stats, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
