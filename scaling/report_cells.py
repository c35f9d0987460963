"""Dashboard pieces that follow the cell's identity: the series each plot draws (one line per
backend, settings and node count, x = total devices, the layout in the hover), the section with
the two verdicts per device count and the rule they follow, and each cell's links to its runs'
records, logs and W&B runs."""
from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import pandas as pd

from scaling import analysis, verdicts


def series(agg: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(backend, line name, rows sorted by N) per line to draw. A backend measured with several
    settings, or the study at several node counts, gets a line per settings and node count, so
    layouts are never joined into one line."""
    several_settings = agg.groupby("backend")["settings"].nunique().gt(1).to_dict() if not agg.empty else {}
    several_nodes = agg["nodes"].nunique() > 1 if not agg.empty else False
    for (backend, settings, nodes), g in agg.groupby(["backend", "settings", "nodes"], sort=True):
        name = backend + (f" [{settings}]" if several_settings.get(backend) and settings else "")
        name += f" ({nodes} node{'s' if nodes > 1 else ''})" if several_nodes else ""
        yield backend, name, g.sort_values("N")


def hover(name: str, what: str) -> str:
    """A hover template naming the line, N, the layout (customdata[0]) and ``what``."""
    return f"{html.escape(name)}<br>N=%{{x}} (layout %{{customdata[0]}})<br>{what}<extra></extra>"


def _verdict_class(row: dict) -> dict:
    v = str(row.get("verdict") or "")
    return {"verdict": "v-tf" if v.startswith("TF ") else "v-torch" if v.startswith("PyTorch ") else "v-none"}


def _interval(lo: float, hi: float) -> str:
    return "-" if lo is None or math.isnan(lo) else f"{lo:.2f} .. {hi:.2f}"


def verdict_section(found: pd.DataFrame, table: Callable[..., str]) -> str:
    """Both verdicts per device count as an HTML table (``table``: the report's table renderer)."""
    if found.empty:
        return "<p>No seed-claim comparison: no successful runs.</p>"
    df = found.copy()
    df["interval"] = [_interval(float(lo), float(hi)) for lo, hi in zip(df["ratio_low"], df["ratio_high"])]
    df["repeats"] = [f"{a:.0f} / {b:.0f}" if a == a and b == b else "-"
                     for a, b in zip(df["tf_repeats"].astype(float), df["torch_repeats"].astype(float))]
    df["p"] = [("-" if p != p else f"{p:.3f} (Holm {q:.3f}, {k:.0f} pairs)")
               for p, q, k in zip(df["p_value"].astype(float), df["p_adjusted"].astype(float), df["pairs"].astype(float))]
    return table(df, [("N", "devices", "d"), ("layout", "layout", "s"), ("question", "question", "s"),
                      ("tf_backend", "best TF backend", "s"), ("tf_value", "TF median", _median),
                      ("torch_backend", "best PyTorch backend", "s"), ("torch_value", "PyTorch median", _median),
                      ("ratio", "TF / PyTorch", ".2f"), ("interval", "95% interval", "s"),
                      ("cliffs_delta", "Cliff's delta", "+.2f"), ("p", "exact p", "s"),
                      ("repeats", "repeats TF / PT", "s"), ("verdict", "verdict", "s")], row_class=_verdict_class)


def _median(value) -> str:
    """Samples/s as a whole number with separators, an efficiency (below 10) to 3 decimals."""
    if value is None or value != value:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.3f}"


def rule_paragraph() -> str:
    return f"<p><b>The rule.</b> {html.escape(verdicts.RULE)}</p>"


def run_links(cells: pd.DataFrame, agg: pd.DataFrame, out_dir: Path) -> list[str]:
    """Per aggregate row, HTML links to each repeat's record JSON, its log (the local launcher's
    ``<run_id>.log`` or a Slurm script's ``<run_id>.<job>.log`` beside the record) and its W&B run
    (the offline run folder, or the online run's page, that the log names). Links are relative to
    ``out_dir``, so the dashboard still finds them when the results folder is moved whole."""
    by_cell = {key: grp for key, grp in cells.groupby(analysis.AGG_KEYS, dropna=False, sort=False)}
    out = []
    for row in agg[analysis.AGG_KEYS].itertuples(index=False):
        runs = by_cell.get(tuple(row))
        if runs is None:
            out.append("")
            continue
        items = []
        for r in runs.sort_values("repeat").to_dict("records"):
            if not r.get("path"):
                continue
            record = Path(r["path"])
            links = [_link(record, out_dir, "record")]
            logs = sorted(record.parent.glob(f"{record.stem}.log")) + sorted(record.parent.glob(f"{record.stem}.*.log"))
            links += [_link(log, out_dir, "log") for log in logs]
            where = _wandb_where(logs)
            if where:
                links.append(_link(Path(where), out_dir, "W&B") if "://" not in where
                             else f"<a href='{html.escape(where)}'>W&amp;B</a>")
            failed = "" if r["status"] == "ok" else " (failed)"
            items.append(f"r{r['repeat']}{failed}: " + " ".join(links))
        out.append("<br>".join(items))
    return out


def _link(path: Path, out_dir: Path, text: str) -> str:
    href = quote(Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix())
    return f"<a href='{html.escape(href)}'>{html.escape(text)}</a>"


def _wandb_where(logs: list[Path]) -> str | None:
    """The W&B run a run's log names (``tracking.WHERE_NOTES``): an offline folder or a URL."""
    from scaling.tracking import WHERE_NOTE

    offline = re.compile(re.escape(WHERE_NOTE) + r"offline run (.+?) \(upload")
    online = re.compile(re.escape(WHERE_NOTE) + r"run (\S+)")
    for log in logs:
        try:
            with log.open(errors="replace") as f:
                for line in f:
                    if WHERE_NOTE in line:
                        found = offline.search(line) or online.search(line)
                        if found:
                            return found.group(1)
        except OSError:
            continue
    return None
