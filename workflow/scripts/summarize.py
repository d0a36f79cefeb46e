"""Snakemake script of rule summarize: final metrics of every experiment as CSV and Markdown, loss curves as PNG."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from hydra_preempt.runlog import read_events  # noqa: E402

COLUMNS = ["experiment", "step", "loss", "restarts", "preemptions", "params_sha256", "overrides"]


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "loss" in record:
            steps.append(record["step"])
            losses.append(record["loss"])
    return steps, losses


def main(snakemake) -> None:
    rows = []
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, overrides, result_path in zip(snakemake.params.names, snakemake.params.overrides, snakemake.input.results):
        run_dir = Path(result_path).parent
        result = json.loads(Path(result_path).read_text())
        preemptions = sum(1 for e in read_events(run_dir) if e["event"] == "stop" and e["reason"] == "preempted")
        rows.append({"experiment": name, **{k: result.get(k) for k in ("step", "loss", "restarts", "params_sha256")},
                     "preemptions": preemptions, "overrides": overrides})
        axes.plot(*loss_curve(run_dir), label=name, linewidth=1)
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
