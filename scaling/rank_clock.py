"""Per-rank timestamps of the timed steps, and what they say about waiting for the slowest rank.

Every rank keeps, per timed step (warm-up excluded), when it began the step and when the step
ended, and, where the backend exposes its collective (the reference loops' one flat all-reduce,
on a host-synchronous path), when it reached the collective and when it left it. The launcher
merges the ranks' series (``merge``) into the record's ``metrics.rank_clock``:

- **waiting**: per step, how long each rank sat in the collective before the last rank reached
  it. With every rank on one host, from the arrival timestamps (``CLOCK_MONOTONIC`` is one clock
  for every process of a host): ``max_r reached_r - reached_r``. With ranks on several hosts (no
  common clock), from each rank's own time in the collective less the shortest one of that step
  (the last to arrive waits for no one): ``in_r - min_r in_r``.
- **skew**: the spread of the ranks' step starts and ends (one host only) and of their arrivals;
  and each rank's own median step, so the slowest rank shows even where waiting cannot.

A backend whose collective runs inside the framework (DDP's bucketed hooks, Horovod's
DistributedOptimizer, tf.distribute), or on CUDA where the host does not see when the device
reaches the collective, has no arrival marks: its waiting is not separable and ``merge`` says so.
No framework is imported here.
"""
from __future__ import annotations

import socket
import statistics
import time
from typing import Any, Callable

from scaling.protocol import Observer

#: at most this many timed steps are kept per rank (the last ones), so the reports stay small
KEEP_STEPS = 4096


class RankClock(Observer):
    """This rank's step and collective timestamps (ns of ``clock``) for the timed steps."""

    def __init__(self, warmup_steps: int, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.warmup_steps = warmup_steps
        self._clock = clock
        self._steps = 0
        self._start: int | None = None
        self._reached: int | None = None
        self._left: int | None = None
        self.marked = False  # whether the backend calls collective_begin / collective_end
        self.start: list[int] = []
        self.end: list[int] = []
        self.reached: list[int | None] = []
        self.left: list[int | None] = []

    def attach(self, backend: Any) -> bool:
        """Let the backend mark its collective (``backend.mark_collective(begin, end)``, where it
        has one it can honestly mark); returns whether it does."""
        hook = getattr(backend, "mark_collective", None)
        self.marked = bool(hook and hook(self.collective_begin, self.collective_end))
        return self.marked

    def step_begin(self) -> None:
        self._start, self._reached, self._left = self._clock(), None, None

    def collective_begin(self) -> None:
        self._reached = self._clock()

    def collective_end(self) -> None:
        self._left = self._clock()

    def advance(self, steps: int) -> None:
        end = self._clock()
        timed = self._steps >= self.warmup_steps
        self._steps += steps
        if not timed or self._start is None:
            return
        # a call of several fused steps has one start and end; its collective marks are the last step's
        self.start.append(self._start)
        self.end.append(end)
        self.reached.append(self._reached if steps == 1 else None)
        self.left.append(self._left if steps == 1 else None)
        if len(self.start) > KEEP_STEPS:
            for series in (self.start, self.end, self.reached, self.left):
                del series[0]
        self._start = None

    def series(self, sync_every: int = 1) -> dict[str, Any]:
        """What this rank reports to the launcher (its exit report's ``rank_clock``)."""
        return {"host": socket.gethostname(), "clock": "monotonic_ns", "sync_every": sync_every,
                "collective_marked": self.marked, "start": self.start, "end": self.end,
                "reached": self.reached if self.marked else None, "left": self.left if self.marked else None}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def waiting_per_step(reached: list[list[int]], left: list[list[int]], one_host: bool) -> list[list[float]]:
    """Seconds each rank (rows) waited in the collective at each step (columns) for the last rank."""
    steps = range(len(reached[0]))
    if one_host:
        last = [max(r[i] for r in reached) for i in steps]
        return [[(last[i] - r[i]) / 1e9 for i in steps] for r in reached]
    inside = [[lo - re for re, lo in zip(r, lv)] for r, lv in zip(reached, left)]
    shortest = [min(x[i] for x in inside) for i in steps]
    return [[(x[i] - shortest[i]) / 1e9 for i in steps] for x in inside]


def spread(per_rank: list[list[int]]) -> list[float]:
    """Per step, the latest minus the earliest rank's timestamp (seconds)."""
    return [(max(column) - min(column)) / 1e9 for column in zip(*per_rank)]


def _rank_means(per_rank: list[list[float]]) -> list[float]:
    """Per step, the mean over ranks."""
    return [sum(column) / len(column) for column in zip(*per_rank)]


def merge(exits: list[dict], backend: str = "this backend") -> dict[str, Any] | None:
    """The run's waiting and skew figures from every rank's ``rank_clock`` series (None when no
    rank sent one, e.g. a single process)."""
    clocks = [e.get("rank_clock") for e in sorted(exits, key=lambda e: e.get("rank", 0))]
    if len(clocks) < 2 or not all(clocks):
        return None
    steps = min(len(c["start"]) for c in clocks)
    hosts = sorted({c["host"] for c in clocks})
    one_host = len(hosts) == 1
    out: dict[str, Any] = {"ranks": len(clocks), "hosts": len(hosts), "steps": steps, "waiting_s": None,
                           "waiting_per_rank_s": None, "arrival_skew_s": None, "in_collective_s": None,
                           "start_skew_s": None, "end_skew_s": None, "step_per_rank_s": None, "method": None,
                           "note": None}
    if steps == 0:
        out["note"] = "no timed step on some rank: nothing to compare"
        return out
    # the last `steps` timed steps of every rank are the same steps (each keeps its last ones)
    tail = [{k: (c[k][-steps:] if c.get(k) is not None else None) for k in ("start", "end", "reached", "left")}
            for c in clocks]
    # each rank's own step (start to end), so the slowest rank shows even where waiting cannot
    out["step_per_rank_s"] = [_median([(e - b) / 1e9 for b, e in zip(t["start"], t["end"])]) for t in tail]
    if one_host:
        out["start_skew_s"] = _median(spread([t["start"] for t in tail]))
        out["end_skew_s"] = _median(spread([t["end"] for t in tail]))
    if any(c.get("sync_every", 1) != 1 for c in clocks):
        out["note"] = (f"waiting not separable for {backend}: steps were not synchronised one by one "
                       "(sync_every > 1), so the host timestamps are dispatch times")
        return out
    marked = all(c.get("collective_marked") for c in clocks) and all(
        t["reached"] is not None and None not in t["reached"] and None not in t["left"] for t in tail)
    if not marked:
        out["note"] = (f"waiting not separable for {backend}: its collective runs inside the framework "
                       "(or on the device), where no rank can mark when it reached it")
        return out
    reached, left = [t["reached"] for t in tail], [t["left"] for t in tail]
    waits = waiting_per_step(reached, left, one_host)
    inside = [[(lo - re) / 1e9 for re, lo in zip(r, lv)] for r, lv in zip(reached, left)]
    out.update(waiting_s=_median(_rank_means(waits)), waiting_per_rank_s=[_median(w) for w in waits],
               in_collective_s=_median(_rank_means(inside)),
               method=("arrival timestamps (one host, CLOCK_MONOTONIC)" if one_host else
                       "each rank's time in the collective less the shortest of that step (ranks on several hosts)"))
    if one_host:
        out["arrival_skew_s"] = _median(spread(reached))
    return out


def into_record(record: dict, exits: list[dict], backend: str) -> None:
    """The launcher's part: put ``merge``'s figures into the record's metrics (when it has some) and
    drop the raw series from the rank reports, which the record lists."""
    figures = merge(exits, backend)
    for e in exits:
        e.pop("rank_clock", None)
    if figures is not None and record.get("metrics") is not None and "sizes" not in record["metrics"]:
        record["metrics"]["rank_clock"] = figures
