"""Put the output of the last `make bench` into BENCHMARKS.md (issue 5).

    .venv/bin/python benchmarks/bench_report.py [--results benchmarks/results] [--report BENCHMARKS.md]

Every benchmark of `make bench` writes its printed report (markdown, with the command that
produced it) to ``results/<name>.md`` and its numbers to ``results/<name>.json``. This script
replaces the part of the report between the markers ``<!-- make bench: begin -->`` and
``<!-- make bench: end -->`` (appended at the end when absent) with those reports in a fixed
order, the date, the machine and the plot. Curated sections elsewhere in the file are left alone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"
ORDER = [("peers", "Kernels side by side: stempy, LiberTEM, ours"), ("storage", "Storage"),
         ("streaming", "End to end at rising rates"), ("scaling", "Scaling"),
         ("counting", "Electron counting of raw frames: ours vs stempy")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--report", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    res, report = Path(a.results), Path(a.report)
    parts = [BEGIN, f"## Last `make bench` run ({datetime.date.today()}, {platform.node()}, "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)", "",
             f"Machine-readable results: `{res}/*.json`. Each section is the benchmark's own output.", ""]
    for name, title in ORDER:
        md = res / f"{name}.md"
        parts += [f"### {title}", "", md.read_text().strip() if md.is_file() else f"(no {md}: not run)", ""]
    if (res / "throughput.png").is_file():
        parts += [f"![throughput against rate and electrons per frame]({res / 'throughput.png'})", ""]
    parts.append(END)
    block = "\n".join(parts)
    text = report.read_text() if report.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.write_text(text)
    print(f"updated {report}")


if __name__ == "__main__":
    main()
