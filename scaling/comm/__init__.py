"""``scaling comm``: the all-reduce micro-benchmark, through each backend's own collective path.

What is measured, in every library alike: one all-reduce (sum) of a float32 buffer of each message
size; ``warmup`` untimed calls, then ``iters`` timed calls, each timed on every rank from the call
until the result is available (device synchronised). A call's latency is the slowest rank's time
for it (ranks' times are exchanged after the timed loop); p50, mean and p95 are over the timed calls.
Bandwidths follow nccl-tests: algbw = bytes / p50 latency, busbw = algbw x 2(N-1)/N.

No framework is imported here: the libraries' paths are in :mod:`scaling.comm.paths`.
"""
from __future__ import annotations

from typing import Any, Iterable

from scaling.protocol import summarize

#: bytes of one float32 element (the gradients' type)
ELEMENT_BYTES = 4


def message_sizes(ccfg: dict, labelled: dict[str, int] | None = None) -> list[tuple[int, str | None]]:
    """(bytes, label) of every message: ``min_bytes`` to ``max_bytes`` stepping by ``size_factor``
    (a power of two), then each labelled size (a workload's gradient), in increasing order."""
    lo, hi, factor = int(ccfg["min_bytes"]), int(ccfg["max_bytes"]), int(ccfg["size_factor"])
    if lo < ELEMENT_BYTES or lo % ELEMENT_BYTES or hi < lo:
        raise ValueError(f"comm.min_bytes={lo}, comm.max_bytes={hi}: need {ELEMENT_BYTES} <= min_bytes <= max_bytes, "
                         f"min_bytes a multiple of {ELEMENT_BYTES}")
    if factor < 2 or factor & (factor - 1):
        raise ValueError(f"comm.size_factor={factor}: must be a power of two >= 2 (2: every power of two)")
    sizes: dict[int, str | None] = {}
    size = lo
    while size <= hi:
        sizes[size] = None
        size *= factor
    for label, nbytes in (labelled or {}).items():
        sizes[int(nbytes)] = label if sizes.get(int(nbytes)) is None else f"{sizes[int(nbytes)]}, {label}"
    return sorted(sizes.items())


def iterations_for(ccfg: dict, nbytes: int) -> int:
    """Timed calls for one size: ``iters``, fewer for large messages (``bytes_per_size`` in all), at
    least ``min_iters``, so the largest sizes do not dominate the run."""
    budget = int(ccfg["bytes_per_size"]) // max(1, nbytes)
    return max(int(ccfg["min_iters"]), min(int(ccfg["iters"]), budget))


def bus_factor(n: int) -> float:
    """nccl-tests' all-reduce bus factor 2(N-1)/N: busbw = algbw x this."""
    return 2.0 * (n - 1) / n if n > 0 else 0.0


def slowest_rank(per_rank: Iterable[Iterable[float]]) -> list[float]:
    """Per call, the latency of the slowest rank (rows: ranks, columns: calls)."""
    return [max(column) for column in zip(*per_rank)]


def size_result(nbytes: int, label: str | None, latencies: list[float], n: int) -> dict[str, Any]:
    """One size's figures: latency statistics, algorithm and bus bandwidth (bytes/s, from p50)."""
    stats = summarize(latencies)
    p50 = stats["p50"]
    algbw = nbytes / p50 if p50 else None
    return {"bytes": nbytes, "elements": nbytes // ELEMENT_BYTES, "label": label, "iters": len(latencies),
            "latency_s": stats, "algbw_bytes_per_s": algbw,
            "busbw_bytes_per_s": algbw * bus_factor(n) if algbw is not None else None}


#: one message size's figures as a flat row: the dashboard's table, a comm cell's W&B history
SIZE_COLUMNS = ["bytes", "label", "iters", "latency_p50_s", "latency_mean_s", "latency_p95_s", "algbw_bytes_per_s",
                "busbw_bytes_per_s"]


def size_row(entry: dict[str, Any]) -> dict[str, Any]:
    """A record's size entry (``size_result``) as a ``SIZE_COLUMNS`` row (no mean in records
    written before it was kept: None)."""
    lat = entry["latency_s"]
    return {"bytes": entry["bytes"], "label": entry.get("label"), "iters": entry["iters"], "latency_p50_s": lat["p50"],
            "latency_mean_s": lat.get("mean"), "latency_p95_s": lat["p95"],
            "algbw_bytes_per_s": entry["algbw_bytes_per_s"], "busbw_bytes_per_s": entry["busbw_bytes_per_s"]}


def at_label(metrics: dict, label: str) -> dict | None:
    """The size entry a label names (e.g. ``mlp`` for the MLP's gradient), or None."""
    for entry in metrics.get("sizes") or []:
        if label in (entry.get("label") or "").split(", "):
            return entry
    return None
