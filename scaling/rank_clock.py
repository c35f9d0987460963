"""Per-rank timestamps of the timed steps, and what they say about waiting for the slowest rank.

Every rank keeps, per timed step (warm-up excluded), when it began the step and when the step
ended, and, where the backend can mark its collective (below), when it reached the collective and
when it left it. The launcher
merges the ranks' series (``merge``) into the record's ``metrics.rank_clock``:

- **waiting**: per step, how long each rank sat in the collective before the last rank reached
  it. With every rank on one host, from the arrival timestamps (``CLOCK_MONOTONIC`` is one clock
  for every process of a host): ``max_r reached_r - reached_r``. With ranks on several hosts (no
  common clock), from each rank's own time in the collective less the shortest one of that step
  (the last to arrive waits for no one): ``in_r - min_r in_r``.
- **skew**: the spread of the ranks' step starts and ends (one host only) and of their arrivals;
  and each rank's own median step, so the slowest rank shows even where waiting cannot.

Where the collective runs inside the framework, the backend marks it from the framework's side
without changing its path: the PyTorch backends when backward has accumulated the rank's last
gradient and when the framework has finished the all-reduce (``torch_common.GradientArrival``), the
TensorFlow ones with timestamps traced into the step (``tf_common.Stamps``; ``tf_multiworker``,
whose Keras optimizer reduces out of sight, marks reaching the collective only, which is all one
host needs). On CUDA (the host does not see when the device reaches the collective), with several
replicas in one process, or with several steps per call, there are no marks: the waiting is not
separable and ``merge`` says so. No framework is imported here.
"""
from __future__ import annotations

import socket
import statistics
import time
from typing import Any, Callable, Optional, Union

from scaling.protocol import Observer

#: a timestamp: ns of the rank's clock, or a function returning them (or None) when the run ends
Stamp = Union[int, Callable[[], Optional[int]]]

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
        self.reached: list[Stamp | None] = []
        self.left: list[Stamp | None] = []

    def attach(self, backend: Any) -> bool:
        """Let the backend mark its collective (``backend.mark_collective(begin, end)``, where it
        has one it can honestly mark); returns whether it does."""
        hook = getattr(backend, "mark_collective", None)
        self.marked = bool(hook and hook(self.collective_begin, self.collective_end))
        return self.marked

    def step_begin(self) -> None:
        self._start, self._reached, self._left = self._clock(), None, None

    def collective_begin(self, at: Stamp | None = None) -> None:
        """This rank reached the collective now, or at ``at``: ns of this clock, or a function
        returning them (or None) when the run ends, where the backend stamps the moment inside its
        step and reading it there would cost (``tf_common.Stamps``)."""
        self._reached = self._clock() if at is None else at

    def collective_end(self, at: Stamp | None = None) -> None:
        self._left = self._clock() if at is None else at

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
                "reached": _read(self.reached) if self.marked else None,
                "left": _read(self.left) if self.marked else None}


def _read(stamps: list) -> list[int | None]:
    """The stamps as ns, those read only now (functions) included."""
    return [s() if callable(s) else s for s in stamps]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def waiting_per_step(reached: list[list[int]], left: list[list[int]] | None, one_host: bool) -> list[list[float]]:
    """Seconds each rank (rows) waited in the collective at each step (columns) for the last rank."""
    steps = range(len(reached[0]))
    if one_host:
        last = [max(r[i] for r in reached) for i in steps]
        return [[(last[i] - r[i]) / 1e9 for i in steps] for r in reached]
    inside = [[lo - re for re, lo in zip(r, lv)] for r, lv in zip(reached, left)]
    shortest = [min(x[i] for x in inside) for i in steps]
    return [[(x[i] - shortest[i]) / 1e9 for i in steps] for x in inside]


#: slack for marks read from a framework's clock (TensorFlow's has microsecond resolution), ns
MARK_SLACK_NS = 2000


def _outside(t: dict, has_left: bool) -> int:
    """How many of a rank's marks fall outside their own step (start <= reached <= left <= end)."""
    slack, bad = MARK_SLACK_NS, 0
    for i, (b, e, r) in enumerate(zip(t["start"], t["end"], t["reached"])):
        left = t["left"][i] if has_left else r
        bad += not (b - slack <= r <= left + slack and left <= e + slack)
    return bad


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
                           "marks_outside_step": None, "note": None}
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
        t["reached"] is not None and None not in t["reached"] for t in tail)
    if not marked:
        out["note"] = (f"waiting not separable for {backend}: no rank could mark when it reached the "
                       "collective (on the device, several replicas or steps per process call)")
        return out
    has_left = all(t["left"] is not None and None not in t["left"] for t in tail)
    out["marks_outside_step"] = outside = sum(_outside(t, has_left) for t in tail)
    if outside:
        out["note"] = (f"waiting not trusted for {backend}: {outside} collective marks fall outside their "
                       "steps (a clock stepped during the run?)")
        return out
    if not one_host and not has_left:
        out["note"] = (f"waiting not separable for {backend} across hosts: its ranks mark when they reach "
                       "the collective but not when they leave it, and hosts share no clock")
        return out
    reached = [t["reached"] for t in tail]
    left = [t["left"] for t in tail] if has_left else None
    waits = waiting_per_step(reached, left, one_host)
    out.update(waiting_s=_median(_rank_means(waits)), waiting_per_rank_s=[_median(w) for w in waits],
               method=("arrival timestamps (one host, CLOCK_MONOTONIC)" if one_host else
                       "each rank's time in the collective less the shortest one of that step "
                       "(ranks on several hosts)"))
    if left is not None:
        inside = [[(lo - re) / 1e9 for re, lo in zip(r, lv)] for r, lv in zip(reached, left)]
        out["in_collective_s"] = _median(_rank_means(inside))
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
