"""The workflow's summary script over what any app may return: odd keys and values, no loss metric."""

import csv
import json
import runpy
from pathlib import Path
from types import SimpleNamespace

SCRIPT = Path(__file__).resolve().parents[2] / "hydra_preempt" / "workflow" / "scripts" / "summarize.py"


def test_any_result_makes_a_readable_table(tmp_path):
    results = {
        "a": {"loss": 0.5, "p|ipe": "v|w", "note": "line1\nline2", "overrides": "mine", "nested": {"x": 1}},
        "b": {"acc": float("nan"), "k,comma": 1},
    }
    paths = []
    for name, result in results.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(result))
        paths.append(str(tmp_path / name / "result.json"))
    out = SimpleNamespace(csv=str(tmp_path / "s.csv"), markdown=str(tmp_path / "s.md"), plot=str(tmp_path / "p.png"))
    fake = SimpleNamespace(
        params=SimpleNamespace(names=list(results), overrides=["optim.lr=0.1", ""]),
        input=SimpleNamespace(results=paths),
        output=out,
    )
    runpy.run_path(str(SCRIPT), init_globals={"snakemake": fake})
    with open(out.csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == ["a", "b"]
    assert rows[0]["overrides"] == "optim.lr=0.1" and rows[0]["p|ipe"] == "v|w" and "nested" not in rows[0]
    table = Path(out.markdown).read_text().splitlines()
    assert len(table) == 4  # header, rule, one line per experiment
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1, table  # every row as wide
    assert Path(out.plot).read_bytes()[:4] == b"\x89PNG"
