"""One-line messages to stderr. Ranks share a terminal (and tests a pipe): each line goes out in a single
write so lines from different ranks never interleave mid-line."""

from __future__ import annotations

import sys


def say(line: str, rank: int | None = None) -> None:
    prefix = f"[rank {rank}] " if rank is not None else ""
    sys.stderr.write(f"{prefix}{line}\n")
    sys.stderr.flush()


def error(message: str, rank: int | None = None) -> None:
    say(f"error: {message}", rank)
