"""The last upgrade as Prometheus metrics, for node-exporter's textfile collector.

Debian's prometheus-node-exporter reads ``*.prom`` files from
/var/lib/prometheus/node-exporter; the restore writes ``seamless.prom`` there (whole,
renamed into place) each time it writes its report, when that directory exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from seamless.memstore.handoff import Report

TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")
NAME = "seamless.prom"


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render(report: Report, blackout: float | None,
           store_free: int | None = None) -> str:
    trees = report.restored_trees
    restored = sum(1 for t in trees if t.get("restored"))
    times = report.times
    metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
        ("seamless_last_upgrade_timestamp_seconds", "gauge",
         "When the last upgrade's restore finished (or began).",
         [("", float(times.get("finished") or times.get("restorer_started") or 0))]),
        ("seamless_last_upgrade_success", "gauge",
         "1 when the last upgrade restored every tree in its new kernel, else 0.",
         [("", 1.0 if report.ok and not report.refused else 0.0)]),
        ("seamless_last_upgrade_refused", "gauge",
         "1 when the new kernel refused the trees and went back to the old one.",
         [("", 1.0 if report.refused else 0.0)]),
        ("seamless_last_upgrade_trees", "gauge", "The last upgrade's trees, by result.",
         [('{result="restored"}', float(restored)),
          ('{result="failed"}', float(len(trees) - restored))]),
        ("seamless_last_upgrade_info", "gauge", "The last upgrade's kernels and generation.",
         [(f'{{from="{_label(report.source or "")}",to="{_label(report.to)}",'
           f'generation="{_label("" if report.generation is None else report.generation)}"}}',
           1.0)]),
    ]
    if blackout is not None:
        metrics.append(("seamless_last_upgrade_blackout_seconds", "gauge",
                        "From the freeze to every tree running again.", [("", blackout)]))
    if store_free is not None:
        metrics.append(("seamless_store_free_bytes", "gauge", "Free space in the store.",
                        [("", float(store_free))]))
    lines = []
    for name, kind, help_text, samples in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value:g}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def write(report: Report, blackout: Callable[[Report], float | None],
          store_free: int | None = None, directory: Path | None = None) -> Path | None:
    """Write ``seamless.prom`` into ``directory`` (node-exporter's) when it is there."""
    directory = TEXTFILE_DIR if directory is None else directory
    if not directory.is_dir():
        return None
    path = directory / NAME
    tmp = directory / f".{NAME}.{os.getpid()}"
    tmp.write_text(render(report, blackout(report), store_free))
    tmp.chmod(0o644)
    tmp.rename(path)
    return path
