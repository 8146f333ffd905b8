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

Standalone: imports only torch. The policy functions and :func:`pack_slot`/:func:`unpack_slot` need nothing;
the ``broadcast_*`` functions need an initialised process group only when called. Two cache layouts are
understood (see :func:`slot_views`): this project's ``KVCache`` (``[layers, 2, tokens, heads, head_dim]``) and
the upstream LiveAvatar list of per-layer dicts (``k``/``v`` ``[batch, tokens, heads, head_dim]`` plus
``cond_k``/``cond_v``/``cond_end``).

Drop-in use in an existing TPP loop (after the rank that ran step ``i`` wrote tokens ``start:end``)::

    buf = kv_sync.make_buffer(kv_cache, start, end)            # once
    if kv_sync.syncs_after_step(policy):
        kv_sync.broadcast_slot(kv_cache, start, end, src=i % N, group=dit_group, buffer=buf)
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


def slot_views(cache, start: int, end: int) -> list[torch.Tensor]:
    """Views of tokens ``[start, end)`` of every layer's keys and values, for either cache layout:

    * :class:`pipeline.kv_cache.KVCache`: one view ``data[:, :, start:end]`` (``[layers, 2, tokens, heads, dim]``);
    * the upstream layout, a list (one per layer) of dicts with ``k``/``v`` ``[batch, tokens, heads, head_dim]``
      (or an object whose ``.layers`` is that list): ``k[:, start:end]``, ``v[:, start:end]`` per layer.
    """
    if hasattr(cache, "data"):
        return [cache.data[:, :, start:end]]
    layers = getattr(cache, "layers", cache)
    return [layer[name][:, start:end] for layer in layers for name in ("k", "v")]


def make_buffer(cache, start: int, end: int) -> torch.Tensor:
    """A flat buffer that holds one slot (allocate once, reuse for every broadcast)."""
    views = slot_views(cache, start, end)
    return torch.empty(sum(v.numel() for v in views), dtype=views[0].dtype, device=views[0].device)


def pack_slot(cache, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy tokens ``[start, end)`` of every layer into one flat buffer (``out`` is reused if given)."""
    views = slot_views(cache, start, end)
    out = out if out is not None else make_buffer(cache, start, end)
    offset = 0
    for v in views:
        out[offset : offset + v.numel()].view(v.shape).copy_(v)
        offset += v.numel()
    return out


def unpack_slot(cache, start: int, end: int, buffer: torch.Tensor) -> None:
    """Write a buffer made by :func:`pack_slot` back into tokens ``[start, end)``."""
    offset = 0
    for v in slot_views(cache, start, end):
        v.copy_(buffer[offset : offset + v.numel()].view(v.shape))
        offset += v.numel()


def _wait(work, timeout: float | None, what: str) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise TimeoutError(what) from e
        raise


def broadcast_slot(cache, start: int, end: int, src: int, group, buffer: torch.Tensor,
                   timeout: float | None = None) -> int:
    """One collective: rank ``src`` sends tokens ``[start, end)`` of every layer to every rank of ``group``;
    the others overwrite theirs. ``buffer`` comes from :func:`make_buffer` (reused: the hot loop allocates
    nothing). Returns the bytes this rank sent (0 unless it is ``src``). ``TimeoutError`` after ``timeout`` s."""
    import torch.distributed as dist

    me = dist.get_rank()
    if me == src:
        pack_slot(cache, start, end, out=buffer)
    work = dist.broadcast(buffer, src=src, group=group, async_op=True)
    _wait(work, timeout, f"KV broadcast of tokens {start}:{end} from rank {src}")
    if me != src:
        unpack_slot(cache, start, end, buffer)
        return 0
    return buffer.numel() * buffer.element_size() * (dist.get_world_size(group) - 1)


def broadcast_block(cache, block: int, src: int, group, buffer: torch.Tensor, timeout: float | None = None) -> int:
    """:func:`broadcast_slot` for block ``block``'s slot (``cache.block_range(block)``)."""
    start, end = cache.block_range(block)
    return broadcast_slot(cache, start, end, src, group, buffer, timeout)


def broadcast_conditioning(cache, src: int, group, timeout: float | None = None) -> int:
    """Once, after prefill: make every replica's conditioning entries (``cond_k``/``cond_v`` of the upstream
    layout, or the sink tokens of a :class:`~pipeline.kv_cache.KVCache`) equal to ``src``'s, so ranks that
    computed their prefill on different hardware still agree bit for bit. Never needed per step."""
    import torch.distributed as dist

    if hasattr(cache, "data"):
        start, end = cache.sink_range()
        return broadcast_slot(cache, start, end, src, group, make_buffer(cache, start, end), timeout)
    layers = getattr(cache, "layers", cache)
    tensors = [layer[name] for layer in layers for name in ("cond_k", "cond_v")]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    work = dist.broadcast(flat, src=src, group=group, async_op=True)
    _wait(work, timeout, f"conditioning broadcast from rank {src}")
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    sent = flat.numel() * flat.element_size() * (dist.get_world_size(group) - 1)
    return sent if dist.get_rank() == src else 0
