"""Snakemake script of rule summarize: final metrics of every experiment as CSV and Markdown, loss curves as PNG.

The columns: the experiment, its final step, restarts and preemptions (from the run log, for any app),
then every key of the apps' result.json files that holds a number, a string or a bool (train.py's:
loss, params_sha256, ...), then the overrides. A run that logged no `loss` metric has no curve.
"""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from hydra_preempt.rundir import RunHistory, read_metrics  # noqa: E402

FIXED = ["experiment", "step", "restarts", "preemptions"]


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    return [r["step"] for r in records], [r["loss"] for r in records]


def markdown_cell(text: str) -> str:
    """One table cell whatever the text holds: a | would split it, a line break would end the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def main(snakemake) -> None:
    rows = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, overrides, result_path in zip(snakemake.params.names, snakemake.params.overrides, snakemake.input.results):
        run_dir = Path(result_path).parent
        result = json.loads(Path(result_path).read_text())
        history = RunHistory.read(run_dir)
        last_stop = history.last_stop or {}
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and k not in (*FIXED, "overrides")}
        rows.append({"experiment": name, "step": result.get("step", last_stop.get("step")), "restarts": history.restarts,
                     "preemptions": history.stop_count("preempted"), **scalars, "overrides": overrides})
        steps, losses = loss_curve(run_dir)
        if not steps:
            continue
        (line,) = axes.plot(steps, losses, label=name, linewidth=1)
        for step, reason in history.interruptions():  # each restart, where the curve resumes
            axes.axvline(step, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.7)
            axes.annotate(reason, (step, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                          color=line.get_color(), ha="right", va="top")
    axes.set(xlabel="step", ylabel="training loss", title="loss curves")
    if axes.lines:
        axes.set_yscale("log")
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no run logged a loss metric", ha="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(snakemake.output.plot, dpi=120)

    columns = FIXED + [k for k in dict.fromkeys(k for row in rows for k in row) if k not in FIXED and k != "overrides"]
    columns.append("overrides")
    # "x": created new (Snakemake removes a job's outputs first), never through a link planted at the name
    with open(snakemake.output.csv, "x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row.get(c, "") for c in columns]
        cells = [f"{v:.6g}" if isinstance(v, float) else f"`{v}`" if c == "overrides" else str(v) for c, v in zip(columns, values)]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    with open(snakemake.output.markdown, "x") as f:
        f.write("\n".join(lines) + "\n")


main(snakemake)  # noqa: F821 (injected by Snakemake's script directive)
