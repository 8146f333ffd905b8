"""The end-of-run summary: per rank busy/wait share and bytes sent, overall throughput and latency.

Latency of a block = from the start of its first step (on DiT rank 0) until the VAE rank has it (decoded and
written, when decoding). Times are seconds since the post-setup barrier on each rank, which every rank leaves
together, so they compare across ranks without synchronised clocks.
"""

from __future__ import annotations


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(stats: dict, latencies, first_block_seconds: float | None) -> dict:
    """Figures derived from ``stats`` (as written to --stats_json) and the VAE rank's block latencies (the
    most recent 10,000 blocks; each block carries its start time through the ring)."""
    seconds = stats["generation_seconds"] or 0.0
    latencies = list(latencies)
    ranks = []
    for r in stats["ranks"]:
        ranks.append({
            "rank": r["rank"], "role": r["role"],
            "busy_pct": 100.0 * r["busy_seconds"] / seconds if seconds else 0.0,
            "wait_pct": 100.0 * r["wait_seconds"] / seconds if seconds else 0.0,
            "bytes_sent": r["bytes_sent"],
        })
    return {
        "blocks_per_second": stats["blocks_per_second"],
        "frames_per_second": stats["video_frames"] / seconds if seconds else 0.0,
        "time_to_first_block_seconds": first_block_seconds,
        "block_latency_p50_seconds": _percentile(latencies, 0.50),
        "block_latency_p95_seconds": _percentile(latencies, 0.95),
        "ranks": ranks,
    }


def format_report(summary: dict, blocks: int, frames: int, seconds: float) -> str:
    def sec(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"

    def mb(n):
        return f"{n / 1e6:.2f} MB"

    lines = [
        f"run report: {blocks} blocks, {frames} frames in {seconds:.2f} s -- "
        f"{summary['blocks_per_second']:.2f} blocks/s, {summary['frames_per_second']:.1f} frames/s, "
        f"first block {sec(summary['time_to_first_block_seconds'])}, block latency p50 "
        f"{sec(summary['block_latency_p50_seconds'])} / p95 {sec(summary['block_latency_p95_seconds'])}",
        f"  {'rank':>4}  {'role':<4}  {'busy':>6}  {'wait':>6}  {'latent sent':>12}  {'KV sent':>12}",
    ]
    for r in summary["ranks"]:
        lines.append(f"  {r['rank']:>4}  {r['role']:<4}  {r['busy_pct']:5.1f}%  {r['wait_pct']:5.1f}%  "
                     f"{mb(r['bytes_sent']['latent']):>12}  {mb(r['bytes_sent']['kv']):>12}")
    return "\n".join(lines)
