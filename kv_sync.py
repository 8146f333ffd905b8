"""KV-cache coherence policies for a timestep-forcing pipeline (step ``i`` runs on DiT rank ``i % N``).

A policy answers three questions: which logical cache does step ``i`` read and write, which caches does a rank
hold, and what must move after a step. Every policy is exact: a distributed run equals a single process running
the same policy (the single process simply holds every logical cache).

``per_step`` (default, the upstream single-GPU semantics)
    One cache per denoising step; step ``i`` always uses cache ``i``. Rank ``r`` holds ``ceil((S - r) / N)``
    caches (steps ``r, r+N, ...``). Caches never leave their rank: zero KV traffic.
``broadcast`` (the semantics of the proposal in the PR discussion)
    One cache, replicated on every DiT rank that owns a step. After step ``i`` the rank that ran it broadcasts
    the block slot that step wrote (all layers, packed into one buffer, one collective over the DiT ranks only)
    so every replica stays identical. Block ``b+1`` reads the history written by the *last* step of block ``b``,
    which serialises the pipeline. Traffic: ``S * (N_active - 1)`` block slots per block.
``unsynced`` (diagnostic only)
    The proposal without its sync: one private cache per rank, step ``i`` uses its rank's cache. It reproduces
    the stale-cache drift the PR describes; useful to show the cache matters, never for production.

Standalone: the policy functions need nothing; :func:`broadcast_block` needs an initialised process group only
when it is called. Shapes: a cache is any object with ``block_view(block) -> Tensor`` (for
:class:`pipeline.kv_cache.KVCache` that is ``[layers, 2, block_tokens, heads, head_dim]``).
"""

from __future__ import annotations

from datetime import timedelta

import torch

POLICIES = ("per_step", "broadcast", "unsynced")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown --kv_sync policy {policy!r}; choose one of {', '.join(POLICIES)}")


def owner_of_step(step: int, num_dit_ranks: int) -> int:
    """The DiT rank that runs denoising step ``step``."""
    return step % num_dit_ranks


def cache_key(policy: str, step: int, num_dit_ranks: int) -> int:
    """Logical cache that step ``step`` reads and writes."""
    if policy == "per_step":
        return step
    if policy == "broadcast":
        return 0
    if policy == "unsynced":
        return step % num_dit_ranks
    check_policy(policy)
    raise AssertionError


def logical_caches(policy: str, num_steps: int, num_dit_ranks: int) -> list[int]:
    """All logical caches of a run (what a single process holds)."""
    return sorted({cache_key(policy, i, num_dit_ranks) for i in range(num_steps)})


def caches_on_rank(policy: str, rank: int, num_steps: int, num_dit_ranks: int) -> list[int]:
    """Logical caches DiT rank ``rank`` holds (a replica, under ``broadcast``). Empty for an idle rank."""
    steps = range(rank, num_steps, num_dit_ranks)
    return sorted({cache_key(policy, i, num_dit_ranks) for i in steps})


def syncs_after_step(policy: str) -> bool:
    """Whether the rank that ran a step must broadcast what it wrote."""
    return policy == "broadcast"


def sync_ranks(policy: str, num_steps: int, num_dit_ranks: int) -> list[int]:
    """Ranks that hold a replica and take part in the broadcast (the DiT ranks that own a step; never the VAE)."""
    if not syncs_after_step(policy):
        return []
    return list(range(min(num_steps, num_dit_ranks)))


def kv_bytes_per_block(policy: str, num_steps: int, num_dit_ranks: int, slot_bytes: int) -> int:
    """KV bytes put on the wire per generated block (sender side, as a broadcast tree would count its root)."""
    group = len(sync_ranks(policy, num_steps, num_dit_ranks))
    return num_steps * slot_bytes * (group - 1) if group > 1 else 0


def pack_block(cache, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy block ``block``'s slot of every layer into one contiguous buffer (``out`` is reused if given)."""
    view = cache.block_view(block)
    if out is None:
        return view.contiguous()
    out.copy_(view)
    return out


def unpack_block(cache, block: int, buffer: torch.Tensor) -> None:
    """Write a buffer made by :func:`pack_block` into block ``block``'s slot."""
    cache.block_view(block).copy_(buffer)


def broadcast_block(cache, block: int, src: int, group, buffer: torch.Tensor, timeout: float | None = None) -> int:
    """One collective: ``src`` sends block ``block``'s slot of every layer to every rank of ``group``; the others
    overwrite theirs. ``buffer`` is a preallocated tensor shaped like ``cache.block_view(block)`` (reused every
    step, so the hot loop allocates nothing). Returns the bytes this rank sent (0 unless it is ``src``).

    Raises ``TimeoutError`` if the collective does not finish within ``timeout`` seconds."""
    import torch.distributed as dist

    me = dist.get_rank()
    if me == src:
        pack_block(cache, block, out=buffer)
    work = dist.broadcast(buffer, src=src, group=group, async_op=True)
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise TimeoutError(f"KV broadcast of block {block} from rank {src}") from e
        raise
    if me != src:
        unpack_block(cache, block, buffer)
        return 0
    return buffer.numel() * buffer.element_size() * (dist.get_world_size(group) - 1)
