"""`hydra-preempt workflow`: the packaged Snakefile's path, and a starter that never overwrites."""

from pathlib import Path

import pytest
import yaml

from hydra_preempt.cli import main
from hydra_preempt.doors.workflow import SNAKEFILE, STARTER_SNAKEFILE

ROOT = Path(__file__).resolve().parents[2]


def test_path_prints_the_packaged_snakefile(capsys):
    assert main(["workflow", "path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == SNAKEFILE and SNAKEFILE.is_file()


def test_the_repository_uses_the_starter_itself():
    assert (ROOT / "Snakefile").read_text() == STARTER_SNAKEFILE
    for profile in ("local", "slurm"):
        assert (ROOT / profile / "config.v8+.yaml").read_text() == (
            SNAKEFILE.parent / "profiles" / profile / "config.v8+.yaml"
        ).read_text()


def test_init_writes_the_starter_for_the_script(tmp_path, capsys):
    assert main(["workflow", "init", str(tmp_path / "new"), "--script", "src/my_app.py"]) == 0
    written = sorted(p.relative_to(tmp_path / "new").as_posix() for p in (tmp_path / "new").rglob("*") if p.is_file())
    assert written == ["Snakefile", "experiments.yaml", "local/config.v8+.yaml", "slurm/config.v8+.yaml"]
    grid = yaml.safe_load((tmp_path / "new" / "experiments.yaml").read_text())
    assert grid["train_script"] == "src/my_app.py"
    assert grid["experiments"] == [{"name": "baseline", "overrides": {}}] and grid["common_overrides"] == {}
    assert "snakemake --profile local" in capsys.readouterr().out


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "experiments.yaml").write_text("mine\n")
    assert main(["workflow", "init", str(tmp_path), "--script", "app.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiments.yaml exist(s); nothing written" in err, err
    assert (tmp_path / "experiments.yaml").read_text() == "mine\n"
    assert not (tmp_path / "Snakefile").exists()


def test_init_without_a_script_is_one_line_of_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["workflow", "init"])
    assert stop.value.code == 2 and "--script" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["#x.py", "null", "a: b.py", "[x].py", "*app.py", "{x}.py"])
def test_the_script_is_written_as_a_yaml_string_whatever_it_holds(tmp_path, script):
    assert main(["workflow", "init", str(tmp_path), "--script", script]) == 0
    assert yaml.safe_load((tmp_path / "experiments.yaml").read_text())["train_script"] == script


def test_a_script_with_a_line_break_is_refused(tmp_path, capsys):
    assert main(["workflow", "init", str(tmp_path), "--script", "y.py\nextra: 1"]) == 2
    assert "without line breaks" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_dangling_link_or_a_file_where_a_directory_goes_is_refused_and_nothing_written(tmp_path, capsys):
    (tmp_path / "Snakefile").symlink_to(tmp_path / "elsewhere")
    assert main(["workflow", "init", str(tmp_path), "--script", "app.py"]) == 2
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "experiments.yaml").exists()
    (tmp_path / "Snakefile").unlink()
    (tmp_path / "local").write_text("a file\n")
    assert main(["workflow", "init", str(tmp_path), "--script", "app.py"]) == 2
    assert "are no directories" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x\n")
    assert main(["workflow", "init", str(tmp_path / "file" / "sub"), "--script", "app.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the starter" in err


def test_the_slurm_profile_fills_in_no_account_or_partition_that_only_looks_set():
    """Unset, the executor asks SLURM for the user's default account and SLURM uses its default
    partition; a pre-filled one (the test cluster's 'research', 'debug') was easy to leave unchanged."""
    import yaml

    profile = yaml.safe_load((SNAKEFILE.parent / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    assert not {"slurm_account", "slurm_partition"} & set(profile["default-resources"])
