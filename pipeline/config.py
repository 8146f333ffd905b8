"""Generation settings: the CLI flags (names follow the upstream LiveAvatar script where it has one) and their
validation. Validation is pure (no collectives, no model loading beyond reading ``config.json`` files), so every
rank reaches the same verdict before any process group exists."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields

import kv_sync

from .checkpoints import checkpoint_root
from .schedule import ORDERS

PATCH = 2  # the transformer's spatial patch (tiny default and Wan checkpoints)
MODELS = ("wan", "upstream_standin")


@dataclass
class GenerationConfig:
    num_gpus_dit: int = 4
    sample_steps: int = 8
    num_blocks: int = 8  # 0 = endless stream (until interrupted)
    frames_per_block: int = 3
    size: str = "128*128"  # H*W in pixels
    base_seed: int = 42
    kv_sync: str = "per_step"
    kv_cache_blocks: int = 4
    sample_shift: float = 5.0
    schedule: str = "looped"
    max_inflight: int = 0  # 0 = automatic
    sink_refresh_block: int = 0  # 0 = keep the reference frame as sink forever
    output: str | None = None
    save_latents: str | None = None
    stats_json: str | None = None
    trace: str | None = None
    reference: bool = False
    verify: bool = False
    device: str = "auto"
    transformer_path: str | None = None
    vae_path: str | None = None
    image: str | None = None
    fps: int = 16
    model: str = "wan"
    simulate_step_ms: float = 0.0
    comm_timeout: float = 300.0
    log_level: str = "info"

    @property
    def height(self) -> int:
        return parse_size(self.size)[0]

    @property
    def width(self) -> int:
        return parse_size(self.size)[1]

    @property
    def endless(self) -> bool:
        return self.num_blocks == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse_size(size: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise ValueError(f"--size must look like H*W (e.g. 128*128), got {size!r}") from None
    return h, w


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line on stderr (no usage dump) and exit code 2."""

    def error(self, message):
        rank = os.environ.get("RANK")
        who = f"[rank {rank}] " if rank is not None else ""
        self.exit(2, f"{who}error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = GenerationConfig()
    p = _OneLineParser(
        description="Streaming block-causal video diffusion with timestep-forcing pipeline parallelism: step i of "
        "every block runs on DiT rank i %% N, one more rank decodes with the VAE. Launch with "
        "torchrun --nproc_per_node=N+1, or run --reference in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("generation")
    g.add_argument("--num_gpus_dit", type=int, default=d.num_gpus_dit, help="DiT ranks N (world size is N+1)")
    g.add_argument("--sample_steps", type=int, default=d.sample_steps, help="denoising steps S per block (any S>=1)")
    g.add_argument("--num_blocks", type=int, default=d.num_blocks, help="blocks to generate; 0 = endless (Ctrl-C ends)")
    g.add_argument("--frames_per_block", type=int, default=d.frames_per_block, help="latent frames per block")
    g.add_argument("--size", default=d.size, help="video height*width in pixels (multiple of 16 for Wan)")
    g.add_argument("--base_seed", type=int, default=d.base_seed, help="seed of noise, conditioning and tiny weights")
    g.add_argument("--sample_shift", type=float, default=d.sample_shift, help="flow-matching timestep shift")
    g.add_argument("--image", default=d.image, help="reference image for the attention sink (VAE-encoded)")
    g.add_argument("--fps", type=int, default=d.fps, help="frame rate of the mp4")
    k = p.add_argument_group("KV cache and schedule")
    k.add_argument("--kv_sync", default=d.kv_sync, choices=kv_sync.POLICIES,
                   help="per_step: one cache per step, no KV traffic (upstream semantics); broadcast: one cache per "
                   "rank, synced after every step (the PR's semantics); unsynced: diagnostic, stale caches")
    k.add_argument("--kv_cache_blocks", type=int, default=d.kv_cache_blocks,
                   help="blocks of history each cache keeps (plus the sink); older blocks roll out")
    k.add_argument("--schedule", default=d.schedule, choices=ORDERS,
                   help="looped: every rank busy (earliest block first); blockwise: the PR's block-by-block loop")
    k.add_argument("--sink_refresh_block", type=int, default=d.sink_refresh_block,
                   help="rolling sink: from this block on, the sink is block 0's last latent frame (0 = off)")
    k.add_argument("--max_inflight", type=int, default=d.max_inflight, help="blocks in flight at once; 0 = auto")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", default=d.output, help="mp4 path; frames are appended as blocks finish "
                   "(omit for latents only, no decoding)")
    o.add_argument("--save_latents", default=d.save_latents, help="torch.save the final latents [C, frames, h, w]")
    o.add_argument("--stats_json", default=d.stats_json, help="write timing, occupancy and traffic as JSON")
    o.add_argument("--trace", default=d.trace, help="Chrome-trace JSON of every action (+ a Gantt PNG beside it)")
    o.add_argument("--log_level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    r = p.add_argument_group("mode, models and devices")
    r.add_argument("--reference", action="store_true", help="run in one process without torch.distributed")
    r.add_argument("--verify", action="store_true", help="after a distributed run, run the reference too and "
                   "print the max abs difference of the latents")
    r.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                   help="auto: cuda+nccl if CUDA is available, else cpu+gloo")
    r.add_argument("--model", default=d.model, choices=MODELS,
                   help="wan: diffusers' WanTransformer3DModel; upstream_standin: a small model written to the "
                   "upstream LiveAvatar calling convention, run through the adapter")
    r.add_argument("--transformer_path", default=d.transformer_path, help="local diffusers WanTransformer3DModel dir")
    r.add_argument("--vae_path", default=d.vae_path, help="local diffusers AutoencoderKLWan dir")
    r.add_argument("--simulate_step_ms", type=float, default=d.simulate_step_ms,
                   help="replace each DiT forward by a sleep of this many ms (schedule studies)")
    r.add_argument("--comm_timeout", type=float, default=d.comm_timeout,
                   help="seconds any rank waits for a peer before the job fails")
    return p


def parse_args(argv=None) -> GenerationConfig:
    ns = build_parser().parse_args(argv)
    return GenerationConfig(**{f.name: getattr(ns, f.name) for f in fields(GenerationConfig)})


def read_checkpoint_config(path: str | None, sub: str) -> tuple[dict | None, str | None]:
    """``(config, error)`` of a local diffusers checkpoint dir (``path`` or ``path/sub``)."""
    if not path:
        return None, None
    if not os.path.isdir(path):
        return None, f"checkpoint directory {path} does not exist"
    cfg = os.path.join(checkpoint_root(path, sub), "config.json")
    if not os.path.isfile(cfg):
        return None, f"{path} has no config.json (nor {sub}/config.json): not a diffusers checkpoint"
    try:
        with open(cfg) as f:
            return json.load(f), None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"cannot read {cfg}: {e}"


def _writable_parent(path: str) -> str | None:
    """Create the parent directory if needed and prove it takes a file; the reason if not (root ignores mode
    bits, so only a real write tells)."""
    import tempfile

    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tpp-write-probe-"):
            pass
    except OSError as e:
        return f"cannot write to directory {parent} ({e.strerror or e})"
    if os.path.isdir(path):
        return f"{path} is a directory"
    return None


def validate(cfg: GenerationConfig, world_size: int | None) -> str | None:
    """The first problem with ``cfg`` as one human sentence, or ``None``. ``world_size`` is ``None`` for
    ``--reference``. Checks only local facts, so every rank agrees."""
    if cfg.num_gpus_dit < 1:
        return f"--num_gpus_dit must be >= 1, got {cfg.num_gpus_dit}"
    if world_size is not None and world_size != cfg.num_gpus_dit + 1:
        return (
            f"world size is {world_size} but --num_gpus_dit {cfg.num_gpus_dit} needs {cfg.num_gpus_dit + 1} "
            f"processes ({cfg.num_gpus_dit} DiT + 1 VAE): launch with torchrun --nproc_per_node="
            f"{cfg.num_gpus_dit + 1} (or --num_gpus_dit {world_size - 1})"
        )
    if cfg.sample_steps < 1:
        return f"--sample_steps must be >= 1, got {cfg.sample_steps}"
    if cfg.num_blocks < 0:
        return f"--num_blocks must be >= 1 (or 0 for an endless stream), got {cfg.num_blocks}"
    if cfg.frames_per_block < 1:
        return f"--frames_per_block must be >= 1, got {cfg.frames_per_block}"
    if cfg.kv_cache_blocks < 1:
        return f"--kv_cache_blocks must be >= 1, got {cfg.kv_cache_blocks}"
    if cfg.sink_refresh_block < 0:
        return f"--sink_refresh_block must be >= 1 (or 0 for off), got {cfg.sink_refresh_block}"
    if cfg.max_inflight < 0:
        return f"--max_inflight must be >= 0, got {cfg.max_inflight}"
    if cfg.kv_sync not in kv_sync.POLICIES:
        return f"--kv_sync must be one of {', '.join(kv_sync.POLICIES)}, got {cfg.kv_sync!r}"
    if cfg.schedule not in ORDERS:
        return f"--schedule must be one of {', '.join(ORDERS)}, got {cfg.schedule!r}"
    if cfg.model not in MODELS:
        return f"--model must be one of {', '.join(MODELS)}, got {cfg.model!r}"
    if cfg.model != "wan" and cfg.transformer_path:
        return f"--transformer_path loads a Wan checkpoint; it does not apply to --model {cfg.model}"
    if cfg.comm_timeout <= 0:
        return f"--comm_timeout must be > 0 seconds, got {cfg.comm_timeout}"
    if cfg.simulate_step_ms < 0:
        return f"--simulate_step_ms must be >= 0, got {cfg.simulate_step_ms}"
    if cfg.fps < 1:
        return f"--fps must be >= 1, got {cfg.fps}"
    try:
        h, w = parse_size(cfg.size)
    except ValueError as e:
        return str(e)
    tcfg, err = read_checkpoint_config(cfg.transformer_path, "transformer")
    if err:
        return f"--transformer_path: {err}"
    vcfg, err = read_checkpoint_config(cfg.vae_path, "vae")
    if err:
        return f"--vae_path: {err}"
    ratio = 8 * ((vcfg or {}).get("patch_size") or 1)  # Wan 2.2's VAE patchifies by 2 on top of its x8
    patch = (tcfg or {}).get("patch_size", [1, PATCH, PATCH])
    multiple = ratio * max(patch[1], patch[2])
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        return f"--size {cfg.size}: height and width must be positive multiples of {multiple} (VAE x{ratio}, patch {patch[1]}x{patch[2]})"
    if cfg.frames_per_block % patch[0]:
        return f"--frames_per_block {cfg.frames_per_block} must be a multiple of the temporal patch {patch[0]}"
    from .vae import TINY_VAE_CONFIG
    from .wan_dit import TINY_TRANSFORMER_CONFIG

    in_ch = (tcfg or TINY_TRANSFORMER_CONFIG).get("in_channels")
    z_dim = (vcfg or TINY_VAE_CONFIG).get("z_dim")
    if in_ch != z_dim:
        return (
            f"transformer in_channels ({in_ch}) != VAE latent channels z_dim ({z_dim}): "
            f"--transformer_path and --vae_path are not from the same model family"
        )
    if cfg.image and not os.path.isfile(cfg.image):
        return f"--image {cfg.image} does not exist"
    for flag, path in (("--output", cfg.output), ("--save_latents", cfg.save_latents),
                       ("--stats_json", cfg.stats_json), ("--trace", cfg.trace)):
        problem = _writable_parent(path) if path else None
        if problem:
            return f"{flag} {path}: {problem}"
    if cfg.verify and cfg.reference:
        return "--verify compares a distributed run with the reference; drop it with --reference"
    if cfg.endless and cfg.verify:
        return "--verify needs a finite --num_blocks"
    return None
