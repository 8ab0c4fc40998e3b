"""Fault injection for tests and chaos drills, driven by the ``KREA2_FAULTS`` environment variable.

A comma-separated list of ``ACTION@STEP[:rank=R]``:

- ``kill@5:rank=1``: rank 1 SIGKILLs itself after step 5 (a crashed node);
- ``stop@4:rank=0``: rank 0 SIGSTOPs itself after step 4 (a silent hang);
- ``nan@3``: the loss of step 3 becomes NaN on every rank (a numerical blow-up);
- ``usr1@6`` / ``term@6``: every rank sends itself SIGUSR1 / SIGTERM after step 6 (Slurm's
  warning before the time limit, a preemption), at an exact point of the step: after the step's
  signals were agreed, before its checkpoint.

With the variable unset nothing here does anything.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from krea2_train.errors import UsageError

ACTIONS = ("kill", "stop", "nan", "usr1", "term")
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: int | None = None


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, rank_part = item.partition(":")
        action, _, step = head.partition("@")
        if action not in ACTIONS or not step.isdigit() or (rank_part and not (rank_part.startswith("rank=") and rank_part[5:].isdigit())):
            raise UsageError(
                f"bad fault {item!r} in KREA2_FAULTS={spec!r}; expected ACTION@STEP[:rank=R] (comma-separated) with ACTION in {ACTIONS}"
            )
        faults.append(Fault(action, int(step), int(rank_part[5:]) if rank_part else None))
    return faults


class FaultInjector:
    """The faults of ``rank``. They fire in a run's first start only (``incarnation`` 1): a group
    restarted after an injected crash replays the same steps and must not crash again."""

    def __init__(self, rank: int, spec: str | None = None, incarnation: int = 1) -> None:
        spec = os.environ.get("KREA2_FAULTS", "") if spec is None else spec
        faults = parse_faults(spec)  # a malformed spec is an error in every incarnation
        self.faults = [f for f in faults if f.rank is None or f.rank == rank] if incarnation == 1 else []

    def poison_loss(self, step: int) -> bool:
        """Whether the loss of ``step`` (1-based, the step being computed) must become NaN."""
        return any(f.action == "nan" and f.step == step for f in self.faults)

    def after_step(self, step: int) -> None:
        for fault in self.faults:
            if fault.step == step and fault.action in _SIGNALS:
                os.kill(os.getpid(), _SIGNALS[fault.action])
