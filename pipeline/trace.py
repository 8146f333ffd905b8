"""A run (or a simulation) as a picture: Chrome-trace JSON (Perfetto, chrome://tracing) and a Gantt PNG.

Input: ``{rank: [(kind, block, step, peer, start_s, end_s), ...]}`` as recorded by the runtime
(``RankStats.timeline``) or made from a :class:`pipeline.simulator.SimResult`.
"""

from __future__ import annotations

import json
import os

COLORS = {"compute": "#4C72B0", "sync": "#C44E52", "decode": "#55A868", "recv": "#CCB974", "send": "#8172B2"}


def sim_timelines(result, unit_seconds: float = 1.0) -> dict[int, list]:
    out: dict[int, list] = {}
    for rank, a, start, end in result.timeline:
        out.setdefault(rank, []).append((a.kind, a.block, a.step, a.peer, start * unit_seconds, end * unit_seconds))
    return out


def write_chrome_trace(timelines: dict[int, list], path: str, roles: dict[int, str] | None = None) -> None:
    events = []
    for rank, rows in sorted(timelines.items()):
        role = (roles or {}).get(rank, "rank")
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"name": f"rank {rank} ({role})"}})
        for kind, block, step, peer, start, end in rows:
            if kind in ("send", "recv") and end - start < 1e-6:
                continue  # posting is instantaneous; the wait shows inside the compute/decode that needed it
            events.append({
                "name": f"{kind} b{block} s{step}", "cat": kind, "ph": "X", "pid": 0, "tid": rank,
                "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6,
                "args": {"block": block, "step": step, "peer": peer},
            })
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


def write_gantt_png(timelines: dict[int, list], path: str, title: str = "", roles: dict[int, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(timelines)
    end = max((row[5] for rows in timelines.values() for row in rows), default=1.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    for y, rank in enumerate(ranks):
        for kind, block, step, _, start, stop in timelines[rank]:
            if kind not in ("compute", "sync", "decode"):
                continue
            ax.barh(y, stop - start, left=start, color=COLORS[kind], edgecolor="white", linewidth=0.3)
            if kind == "compute" and (stop - start) > end / 60:
                ax.text(start + (stop - start) / 2, y, f"{block}.{step}", ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r} ({(roles or {}).get(r, '')})" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since start (labels: block.step)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in ("compute", "sync", "decode")]
    ax.legend(handles, ["DiT step", "KV broadcast", "VAE decode / write"], loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".part.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
