"""`hydra-preempt validate` for real: child processes killed, signalled, resumed; the disk measured."""

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

EXPECTED = {
    "checkpoint atomicity",
    "retention",
    "throughput: raw disk",
    "throughput: save",
    "throughput: load",
    "grace period fit",
    "signal USR1",
    "signal TERM",
    "signal INT",
    "exact resume",
    "distributed gloo",
    "distributed nccl",
    "GPU metrics (NVML)",
}
DISK = {"checkpoint atomicity", "retention", "throughput: raw disk", "throughput: save", "throughput: load"}


def validate(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "hydra_preempt.cli", "validate", "--json", "--state-gb", "0.05", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, json.loads(out), err


def test_validate_passes_here_and_fails_only_the_disk_rows_of_an_unwritable_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # Both at once: the machine's two cores are shared either way, and the test takes half as long
    good_proc = validate("--checkpoint-dir", str(tmp_path / "ck"))
    bad_proc = validate("--checkpoint-dir", str(blocker / "ck"))
    (good_rc, good, good_err), (bad_rc, bad, bad_err) = finish(good_proc), finish(bad_proc)

    assert {r["name"] for r in good["rows"]} == EXPECTED
    for row in good["rows"]:
        assert set(row) >= {"name", "status", "reason", "figures"} and row["reason"], row
        assert row["status"] in ("PASS", "SKIP"), row
    assert good_rc == 0 and good["ok"], good_err
    assert "Traceback" not in good_err
    by_name = {r["name"]: r for r in good["rows"]}
    assert by_name["exact resume"]["status"] == "PASS" and by_name["signal TERM"]["figures"]["exit_code"] == 75
    assert by_name["throughput: save"]["figures"]["save_gbps"] > 0
    assert list((tmp_path / "ck").iterdir()) == []  # its work directory is removed, the directory kept

    assert bad_rc == 1 and not bad["ok"]
    statuses = {r["name"]: r["status"] for r in bad["rows"]}
    assert set(statuses) == EXPECTED
    for name in DISK:
        assert statuses[name] == "FAIL"
        assert "not usable" in next(r["reason"] for r in bad["rows"] if r["name"] == name)
    assert {statuses[name] for name in EXPECTED - DISK - {"grace period fit"}} <= {"PASS", "SKIP"}
    assert statuses["signal INT"] == statuses["distributed gloo"] == "PASS"  # the rest still ran
    assert "Traceback" not in bad_err


def test_validate_refuses_a_bad_state_size_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "validate", "--state-gb", "-3"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--state-gb" in done.stderr and "Traceback" not in done.stderr


def saved_past(directory, step):
    """A step directory of `step` or later stands (retention removes the older ones as saves go on)."""
    return any(p.name[5:].isdigit() and int(p.name[5:]) >= step for p in directory.glob("step-*"))


def test_the_atomicity_check_judges_the_save_the_kill_met_when_its_reader_lags(tmp_path, monkeypatch):
    """Under load the check reads the child's lines late: the child may be several saves past the
    'saving N' line just read when the kill lands. The check judges the last save the child began."""
    from hydra_preempt.validate import checks

    directory = tmp_path / "ck"
    wait_for = checks.Child.wait_for

    def lagging(self, pattern, timeout=checks._WAIT_S):
        if pattern == r"^saving (\d+)$":  # the reader falls behind: the child saves on meanwhile
            deadline = time.monotonic() + 60
            while not saved_past(directory, 5) and time.monotonic() < deadline:
                time.sleep(0.05)
        return wait_for(self, pattern, timeout)

    monkeypatch.setattr(checks.Child, "wait_for", lagging)
    row = checks.check_atomicity(directory)
    assert row.status == checks.PASS, row
    assert row.figures["killed_during_step"] >= 5, row
