"""Snakemake script of rule summarize: final metrics of every experiment as CSV and Markdown, loss curves as PNG."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from hydra_preempt.rundir import RunHistory, read_metrics  # noqa: E402

COLUMNS = ["experiment", "step", "loss", "restarts", "preemptions", "params_sha256", "overrides"]


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    return [r["step"] for r in records], [r["loss"] for r in records]


def main(snakemake) -> None:
    rows = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, overrides, result_path in zip(snakemake.params.names, snakemake.params.overrides, snakemake.input.results):
        run_dir = Path(result_path).parent
        result = json.loads(Path(result_path).read_text())
        preemptions = RunHistory.read(run_dir).stop_count("preempted")
        rows.append({"experiment": name, **{k: result.get(k) for k in ("step", "loss", "restarts", "params_sha256")},
                     "preemptions": preemptions, "overrides": overrides})
        (line,) = axes.plot(*loss_curve(run_dir), label=name, linewidth=1)
        for step, reason in RunHistory.read(run_dir).interruptions():  # each restart, where the curve resumes
            axes.axvline(step, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.7)
            axes.annotate(reason, (step, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                          color=line.get_color(), ha="right", va="top")
    axes.set(xlabel="step", ylabel="training loss", yscale="log", title="loss curves")
    axes.legend()
    figure.tight_layout()
    figure.savefig(snakemake.output.plot, dpi=120)

    with open(snakemake.output.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.6g}" if isinstance(row[c], float) else f"`{row[c]}`" if c == "overrides" else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    Path(snakemake.output.markdown).write_text("\n".join(lines) + "\n")


main(snakemake)  # noqa: F821 (injected by Snakemake's script directive)
