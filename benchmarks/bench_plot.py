"""Plot of the benchmark results (issue 5, item 5): throughput against the target rate (end to
end) and cost against electrons per frame (operators).

    .venv/bin/python benchmarks/bench_plot.py [--results benchmarks/results] [--out benchmarks/results/throughput.png]

Reads streaming.json (bench_streaming.py --json) and scaling.json (bench_scaling.py --json);
a panel whose file is missing says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    res = Path(a.results)
    out = Path(a.out) if a.out else res / "throughput.png"
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)

    s = res / "streaming.json"
    if s.is_file():
        d = json.loads(s.read_text())
        top = 0.0
        for auth, marker, color in (("on", "o-", "tab:blue"), ("off", "s--", "tab:orange")):
            rows = [r for r in d["rows"] if r.get("auth", "on") == auth]
            paced = [r for r in rows if r["target"] != "max"]
            if not rows:
                continue
            x = [float(r["target"]) for r in paced]
            what = "CURVE + TLS" if auth == "on" else "no authentication"
            ax1.plot(x, [r["achieved"] for r in paced], marker, color=color,
                     label=f"achieved, {what}" + (" (0 lost)" if all(r["lost"] == 0 for r in paced) else ""))
            top = max([top, *x, *(r["achieved"] for r in rows)])
            for r in rows:
                if r["target"] == "max":
                    ax1.axhline(r["achieved"], color=color, ls=":", label=f"unpaced, {what}: {r['achieved']:,.0f}/s")
        ax1.plot([0, top], [0, top], ":", color="0.5", label="target")
        ax1.set_xlabel("emulator target rate (frames/s)")
        ax1.set_ylabel("frames/s written to the scan file")
        ax1.set_title(f"end to end, {d['scan']} scan, {d['dose']:g} e⁻/frame, {d['workers']} workers")
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, f"no {s.name}: run bench_streaming.py --json", ha="center", transform=ax1.transAxes)
        ax1.set_axis_off()

    s = res / "scaling.json"
    if s.is_file():
        d = json.loads(s.read_text())["operators"]["events_per_frame"]
        ev = [r["events"] for r in d]
        fps = [r["frames"] / r["seconds"] for r in d]
        ax2.loglog(ev, fps, "o-", label="frames/s")
        ax2.loglog(ev, [r["electrons"] / r["seconds"] for r in d], "s-", label="electrons/s")
        ax2.set_xlabel("electrons per frame")
        ax2.set_ylabel("per second, one core")
        ax2.set_title("default operators, 576² detector")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, f"no {s.name}: run bench_scaling.py --json", ha="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
