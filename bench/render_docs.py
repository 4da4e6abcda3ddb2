#!/usr/bin/env python
"""Tables in docs/ generated from the JSON a bench wrote, so that a page shows what was measured, not
what someone copied.

    python bench/render_docs.py bench_infer RESULT.json docs/inference-speed.md --date 2026-12-05 --commit abc1234 \
        --machine "2-core Xeon (AMX)" --command "python bench/bench_infer.py --run-dir RUN --json RESULT.json"

The page holds the generated block between `<!-- bench_infer:start -->` and `<!-- bench_infer:end -->`;
a new measurement is rendered with the previous blocks kept under it (newest first), so the page
is a record. Only bench_infer has a renderer so far.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _median(values) -> float:
    return statistics.median(values)


def render_bench_infer(report: dict, head: str) -> str:
    lines = [head, "",
             f"Run: {report['models']} model(s), {report['mode']}, amp {report['amp']}, {report['threads']} threads, "
             f"medians of {report['repeats']} repeats (every repeat listed).", "",
             "| series | slices | end to end s | bare forward s | ratio | read | preprocess | network | crf | invert | postprocess | write |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["speed"]:
        st = row["stages_s"]
        lines.append(f"| {row['case']} | {row['slices']} | {_median(row['e2e_s']):.3f} ({', '.join(f'{v:.3f}' for v in row['e2e_s'])}) "
                     f"| {_median(row['bare_s']):.3f} ({', '.join(f'{v:.3f}' for v in row['bare_s'])}) | **{row['ratio']:.2f}** | "
                     + " | ".join(f"{st.get(s, 0.0):.3f}" for s in ("read", "preprocess", "network", "crf", "invert", "postprocess", "write"))
                     + " |")
    lines.append("")
    for modality, s in report.get("summary", {}).items():
        lines.append(f"- {modality}: median {s['seconds']:.2f} s per series, **{s['ratio']:.2f}x** the bare forward passes")
    tp = report.get("throughput")
    if tp:
        lines.append(f"- all {tp['series']} series as one run: {tp['infer_s_per_series']:.3f} s per series against "
                     f"{tp['bare_s_per_series']:.3f} s of forward passes, **{tp['ratio']:.2f}x** (walls "
                     f"{', '.join(f'{v:.2f}' for v in tp['walls_s'])} s)")
    cmd = report.get("command")
    if cmd:
        lines.append(f"- `run.py infer` over the {cmd['series']} series in a fresh process: {cmd['wall_s']:.1f} s with "
                     f"start-up, peak RSS **{cmd['peak_rss_mb']:.0f} MB**")
    masks = report.get("masks")
    if masks:
        same = sum(m["voxels_differ"] == 0 for m in masks)
        worst = min(m["dice"] for m in masks)
        lines.append(f"- masks against the reference path (MONAI's steps, full inversion): {same} of {len(masks)} "
                     f"identical" + ("" if same == len(masks) else f", lowest Dice {worst:.6f}"))
    lines.append(f"- peak RSS of the bench process itself: {report.get('bench_peak_rss_mb', float('nan')):.0f} MB")
    return "\n".join(lines)


RENDERERS = {"bench_infer": render_bench_infer}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=sorted(RENDERERS))
    ap.add_argument("result", type=Path)
    ap.add_argument("page", type=Path)
    ap.add_argument("--date", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    report = json.loads(args.result.read_text())
    head = (f"#### {args.date} · {args.commit} · {args.machine}{' · ' + args.title if args.title else ''}\n\n"
            f"`{args.command}`")
    block = RENDERERS[args.bench](report, head)
    start, end = f"<!-- {args.bench}:start -->", f"<!-- {args.bench}:end -->"
    text = args.page.read_text() if args.page.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        inside, after = rest.split(end, 1)
        text = f"{before}{start}\n{block}\n\n{inside.strip()}\n{end}{after}"
    else:
        text = f"{text.rstrip()}\n\n{start}\n{block}\n{end}\n"
    args.page.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
