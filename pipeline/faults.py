"""Fault injection for tests: make one rank raise, exit or stall at a chosen (block, step).

    TPP_FAULT="rank=1,block=2,step=3,action=raise"     # raise | exit | stall
    TPP_FAULT="rank=4,block=5,action=exit"              # on the VAE rank: before decoding block 5

``stall`` sends the process SIGSTOP (a hung GPU, a frozen node): it stops answering without exiting.
"""

from __future__ import annotations

import os
import signal

ENV = "TPP_FAULT"


class InjectedFault(RuntimeError):
    pass


def _parse() -> dict | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    fields = dict(part.split("=", 1) for part in spec.split(",") if part)
    return {"rank": int(fields["rank"]), "block": int(fields["block"]), "step": int(fields.get("step", -1)),
            "action": fields.get("action", "raise")}


_FAULT = _parse()


def maybe_fail(rank: int, block: int, step: int = -1) -> None:
    """Called before each compute (DiT ranks) and each decode (VAE rank, ``step=-1``)."""
    f = _FAULT
    if f is None or f["rank"] != rank or f["block"] != block or f["step"] not in (-1, step):
        return
    if f["action"] == "exit":
        os._exit(3)
    if f["action"] == "stall":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise InjectedFault(f"injected fault at block {block} step {step}")
