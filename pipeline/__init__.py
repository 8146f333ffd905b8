"""Timestep-forcing pipeline parallelism (TPP) for block-causal streaming video diffusion.

Modules, one idea each:
    kv_cache    rolling block-causal KV cache (sink + ring of block slots)
    wan_dit     diffusers' WanTransformer3DModel made block-causal through attention processors
    vae         diffusers' AutoencoderKLWan as a streaming decoder, image encoder for the sink
    video       mp4 writer that appends frames as they arrive and finalises atomically
    config      the generation settings, CLI flags and their validation
    schedule    each rank's ordered action list (plain data), built lazily for any stream length
    simulator   replays action lists under a cost model: deadlock, makespan, occupancy
    reference   the single-process sampling loop, the definition of correct output
    runtime     executes a rank's action list with torch.distributed
"""
