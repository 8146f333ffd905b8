"""Executes one rank's action list (``pipeline.schedule``) with torch.distributed.

DiT ranks run ``compute``/``send``/``recv``/``sync`` exactly in list order; the VAE rank receives finished
blocks on a thread and decodes them on the main thread (so a Ctrl-C is handled promptly there and the mp4 is
finalised). Every blocking wait is bounded by ``--comm_timeout`` and names what it waited for.
"""

from __future__ import annotations

import math
import queue
import resource
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

import kv_sync

from .components import Components
from .config import GenerationConfig
from .faults import maybe_fail
from .schedule import SINK, Action, Schedule


class CommTimeout(RuntimeError):
    pass


class RankFailure(RuntimeError):
    """Any other error on a rank, with the action it was running."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; raised at a block boundary, never inside a frame write."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """Set by a signal handler, acted on between blocks (an exception raised inside ffmpeg's pipe write or a
    half-decoded block would be worse than a few hundred milliseconds of delay)."""

    signum: int | None = None

    @classmethod
    def handler(cls, signum, _frame) -> None:
        cls.signum = cls.signum or signum

    @classmethod
    def check(cls) -> None:
        if cls.signum is not None:
            raise Interrupted(cls.signum)


@dataclass
class RankStats:
    rank: int
    role: str
    busy_seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_latent: int = 0
    bytes_kv: int = 0
    # (kind, block, step, peer, start, end) relative to the post-setup barrier; capped for endless streams
    timeline: list = field(default_factory=list)
    timeline_cap: int = 50_000  # ~5 MB; keeps memory flat on endless streams
    generation_seconds: float = 0.0  # VAE rank: barrier -> last block handled
    first_block_seconds: float | None = None  # VAE rank: barrier -> block 0 handled
    latencies: deque = field(default_factory=lambda: deque(maxlen=10_000))  # VAE rank: recent block latencies

    def record(self, a: Action, start: float, end: float, t0: float) -> None:
        if len(self.timeline) < self.timeline_cap:
            self.timeline.append((a.kind, a.block, a.step, a.peer, start - t0, end - t0))

    def summary(self) -> dict:
        return {
            "rank": self.rank,
            "role": self.role,
            "busy_seconds": self.busy_seconds,
            "wait_seconds": self.wait_seconds,
            "bytes_sent": {"latent": self.bytes_latent, "kv": self.bytes_kv},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


def sink_shape(block_shape) -> tuple:
    c, _, h, w = block_shape
    return (c, 1, h, w)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Point-to-point latents with bounded waits. A message to oneself (N = 1) is handed over locally.

    Each message is the flattened latent plus one trailing float: the block's start time (seconds since the
    post-setup barrier, which all ranks leave together), carried hop to hop so the VAE rank knows each block's
    latency while it runs. The latent values travel unchanged."""

    def __init__(self, rank: int, timeout: float, stats: RankStats):
        self.rank, self.timeout, self.stats = rank, timeout, stats
        self._local: dict[tuple[int, int], torch.Tensor] = {}
        self._sends: deque = deque()

    def post_recv(self, a: Action, shape, device, dtype) -> tuple:
        if a.peer == self.rank:
            return (a, None, None, shape)
        buf = torch.empty(math.prod(shape) + 1, device=device, dtype=dtype)
        return (a, buf, dist.irecv(buf, src=a.peer), shape)

    def wait_recv(self, pending: tuple, waiting_for: str) -> tuple[torch.Tensor, float]:
        """``(latent, block start time)``."""
        a, buf, work, shape = pending
        if work is None:
            return self._local.pop((a.block, a.step))
        self._wait(work, f"the latent of block {a.block} after step {a.step} from rank {a.peer} ({waiting_for})")
        return buf[:-1].view(shape), float(buf[-1])

    def isend(self, a: Action, tensor: torch.Tensor, started: float = 0.0) -> None:
        if a.peer == self.rank:
            self._local[(a.block, a.step)] = (tensor, started)
            return
        message = torch.cat([tensor.reshape(-1), tensor.new_tensor([started])])
        self._sends.append((a, message, dist.isend(message, dst=a.peer)))
        self.stats.bytes_latent += _nbytes(message)
        # Reap old sends (they are from earlier in the list, so their receivers have posted by now).
        while len(self._sends) > 8:
            self._reap()

    def flush(self) -> None:
        while self._sends:
            self._reap()

    def _reap(self) -> None:
        a, _, work = self._sends.popleft()
        self._wait(work, f"rank {a.peer} to take the latent of block {a.block} after step {a.step}")

    def _wait(self, work, what: str) -> None:
        start = time.perf_counter()
        try:
            work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise CommTimeout(f"rank {self.rank} waited {self.timeout:g}s for {what}") from None
            raise
        finally:
            self.stats.wait_seconds += time.perf_counter() - start


class DitRank:
    """One DiT rank: its caches, its in-flight messages, and the loop that follows its action list."""

    def __init__(self, rank: int, cfg: GenerationConfig, comps: Components, schedule: Schedule, kv_group,
                 stats: RankStats):
        self.rank, self.cfg, self.comps, self.schedule, self.kv_group, self.stats = (
            rank, cfg, comps, schedule, kv_group, stats)
        n, steps = cfg.num_gpus_dit, cfg.sample_steps
        self.caches = comps.new_caches(kv_sync.caches_on_rank(cfg.kv_sync, rank, steps, n), cfg.kv_cache_blocks)
        self.cache_of_step = {i: kv_sync.cache_key(cfg.kv_sync, i, n) for i in schedule.steps_of(rank)}
        self.comm = Comm(rank, cfg.comm_timeout, stats)
        # One preallocated buffer for every KV broadcast (broadcast policy only).
        self.kv_buffer = None
        if self.caches and schedule.sync_group:
            replica = next(iter(self.caches.values()))
            self.kv_buffer = kv_sync.make_buffer(replica, *replica.block_range(0))
            # Once, not per step: every replica's conditioning/sink equal to rank 0's, even if ranks computed
            # their prefill on hardware that rounds differently.
            stats.bytes_kv += kv_sync.broadcast_conditioning(replica, schedule.sync_group[0], kv_group,
                                                             cfg.comm_timeout)
        self.recvs: dict[tuple[int, int], tuple] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}  # latent, block start time
        self.t0 = time.perf_counter()
        self.new_sink: torch.Tensor | None = None  # rolling sink, once received

    def run(self) -> None:
        """Wait until every rank is set up, then follow ``schedule.actions(rank)``."""
        _barrier(self.cfg)
        self.t0 = t0 = time.perf_counter()
        for a in self.schedule.actions(self.rank):
            start = time.perf_counter()
            try:
                self.execute(a)
            except CommTimeout:
                raise
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else ""
                raise RankFailure(f"rank {self.rank} failed at {a}: {type(e).__name__}: {first}") from e
            self.stats.record(a, start, time.perf_counter(), t0)
        self.comm.flush()

    def execute(self, a: Action) -> None:
        comps, stats = self.comps, self.stats
        if a.kind == "recv":
            shape = comps.block_shape if a.step != SINK else sink_shape(comps.block_shape)
            self.recvs[(a.block, a.step)] = self.comm.post_recv(a, shape, comps.device, comps.dit.dtype)
        elif a.kind == "refresh":
            if self.new_sink is None:
                self.new_sink, _ = self.comm.wait_recv(self.recvs.pop((0, SINK)), "the rolling sink frame")
            begin = time.perf_counter()
            comps.refresh_sink(self.caches[a.step], self.new_sink)
            stats.busy_seconds += time.perf_counter() - begin
        elif a.kind == "compute":
            maybe_fail(self.rank, a.block, a.step)
            if a.step == 0:
                x, started = comps.noise(a.block), time.perf_counter() - self.t0
            else:
                x, started = self.comm.wait_recv(self.recvs.pop((a.block, a.step - 1)), f"to run step {a.step}")
            begin = time.perf_counter()
            x = comps.denoise_step(self.caches[self.cache_of_step[a.step]], a.block, a.step, x)
            stats.busy_seconds += time.perf_counter() - begin
            self.outputs[(a.block, a.step)] = (x, started)
        elif a.kind == "send":
            self.comm.isend(a, *self.outputs.pop((a.block, a.step)))
        elif a.kind == "sync":
            cache = self.caches[kv_sync.cache_key(self.cfg.kv_sync, a.step, self.cfg.num_gpus_dit)]
            begin = time.perf_counter()
            try:
                stats.bytes_kv += kv_sync.broadcast_block(cache, a.block, a.peer, self.kv_group, self.kv_buffer,
                                                          self.cfg.comm_timeout)
            except TimeoutError:
                raise CommTimeout(
                    f"rank {self.rank} waited {self.cfg.comm_timeout:g}s for the KV broadcast of block {a.block} "
                    f"step {a.step} from rank {a.peer}"
                ) from None
            finally:
                stats.wait_seconds += time.perf_counter() - begin
        else:
            raise RuntimeError(f"a DiT rank cannot run {a}")


def receive_blocks(cfg: GenerationConfig, shape, device, dtype, schedule: Schedule, stats: RankStats):
    """VAE rank: yield ``(block, latent)`` in order as blocks arrive (a thread receives, so the consumer's
    decoding overlaps the next receive). Time the consumer spends between yields is this rank's busy time;
    when the stream ends, ``stats.generation_seconds`` holds the time since the post-setup barrier."""
    rank = schedule.vae_rank
    # The receiving thread's waits overlap decoding; the rank's wait is the main thread's wait for a block.
    comm = Comm(rank, cfg.comm_timeout, RankStats(rank, "vae-receiver"))
    arrivals: queue.Queue = queue.Queue(maxsize=4)  # bounded: a slow decoder holds the ring back, not memory
    _barrier(cfg)
    t0 = time.perf_counter()

    def receive():
        try:
            pending, sink = {}, None
            for a in schedule.actions(rank):
                start = time.perf_counter()
                if a.kind == "recv":
                    pending[a.block] = comm.post_recv(a, shape, device, dtype)
                elif a.kind == "send" and a.step == SINK:
                    comm.isend(a, sink)  # rolling sink to DiT rank a.peer
                elif a.kind == "decode":
                    latent, started = comm.wait_recv(pending.pop(a.block), "to decode it")
                    if a.block == 0:
                        sink = latent[:, -1:].contiguous()  # block 0's last latent frame
                    stats.record(Action("recv", a.block, a.step, a.peer), start, time.perf_counter(), t0)
                    arrivals.put((a.block, latent, started))
            comm.flush()
        except BaseException as e:  # handed to the main thread, which reports it
            arrivals.put(e)
        else:
            arrivals.put(None)

    threading.Thread(target=receive, name="vae-recv", daemon=True).start()
    while True:
        StopRequest.check()
        begin = time.perf_counter()
        try:
            item = arrivals.get(timeout=0.2)  # a timed get keeps Ctrl-C responsive
        except queue.Empty:
            continue
        finally:
            stats.wait_seconds += time.perf_counter() - begin
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        block, latent, started = item
        maybe_fail(rank, block)
        start = time.perf_counter()
        yield block, latent
        end = time.perf_counter()
        stats.busy_seconds += end - start
        stats.record(Action("decode", block, cfg.sample_steps - 1), start, end, t0)
        stats.generation_seconds = end - t0
        stats.latencies.append(end - t0 - started)  # first step started -> block handled (written)
        if block == 0:
            stats.first_block_seconds = end - t0


def _barrier(cfg: GenerationConfig) -> None:
    """All ranks finished setup (models built, caches prefilled) before the clock starts."""
    work = dist.barrier(async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=cfg.comm_timeout))
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise CommTimeout(
                f"rank {dist.get_rank()} waited {cfg.comm_timeout:g}s for the others to finish setup") from e
        raise RankFailure(f"rank {dist.get_rank()} lost a peer during setup (its own message says why)") from e
