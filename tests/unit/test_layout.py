"""The architecture as checks: layers, no import cycles, no process-global hand-offs, light entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hydra_preempt"
# The package's __init__ is the public facade: it re-exports (lazily) from every layer, doors included.
FACADE = "hydra_preempt"
ENTRY_POINTS = {"hydra_preempt.cli"}  # the command line sits above the doors


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Every module (of any package) this module imports, at any depth of its code."""
    found: set[str] = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[: len(base) - node.level + 1])
                target = f"{parent}.{node.module}" if node.module else parent
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {
        name: {m for m in imports_of(name, tree, name in packages) if m in mods and m != name}
        for name, tree in mods.items()
    }


def test_the_core_never_imports_a_door():
    for name, targets in graph().items():
        if name == FACADE or name in ENTRY_POINTS or name.startswith("hydra_preempt.doors"):
            continue
        doors = sorted(t for t in targets if t.startswith("hydra_preempt.doors"))
        assert not doors, f"{name} imports the door(s) {doors}"


def test_only_the_doors_know_submitit_and_hydra():
    for name, tree in modules().items():
        if name.startswith("hydra_preempt.doors") or name == FACADE:
            continue
        foreign = {m.split(".")[0] for m in imports_of(name, tree, False)} & {"submitit", "hydra", "snakemake"}
        assert not foreign, f"{name} imports {sorted(foreign)}"


def test_no_library_module_imports_the_facade():
    for name, targets in graph().items():
        assert FACADE not in targets or name == FACADE, f"{name} imports the package facade; import the module instead"


def test_the_import_graph_has_no_cycles():
    edges = {n: {t for t in ts if t != FACADE} for n, ts in graph().items() if n != FACADE}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_process_global_state_is_written():
    """No `global` statements and no writes to os.environ anywhere in the library."""
    for name, tree in modules().items():
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"{name}:{node.lineno} uses `global`"
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign)
                else []
            )
            for target in targets:
                text = ast.unparse(target)
                assert "environ" not in text, f"{name}:{node.lineno} writes {text}"


def test_light_entry_points_do_not_load_torch():
    """Hydra imports the launcher's config at every start; `hydra-preempt status` only reads files."""
    code = (
        "import sys, hydra_preempt.cli, hydra_preempt.doors.hydra_sweep, hydra_plugins.hydra_preempt_launcher.config;"
        "heavy = sorted({'torch', 'submitit', 'numpy'} & set(sys.modules)); print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_public_api_imports_from_the_package():
    code = "from hydra_preempt import PreemptibleTask, preemptible_executor, run, Session, JobContext, ExecutorSettings"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# The layers, lowest first: a module imports only from layers below its own (or within its own package).
LAYERS = [
    ["hydra_preempt.errors", "hydra_preempt.guard"],
    ["hydra_preempt.fsutil", "hydra_preempt.config"],
    ["hydra_preempt.rundir"],
    ["hydra_preempt.outcome", "hydra_preempt.distributed", "hydra_preempt.data", "hydra_preempt.loader_position"],
    ["hydra_preempt.gpumetrics", "hydra_preempt.slurm", "hydra_preempt.checkpoint"],
    ["hydra_preempt.session"],
    [
        "hydra_preempt.validate",
        "hydra_preempt.doors",
        "hydra_preempt.workflow",
        "hydra_preempt.lightning",
        "hydra_preempt.transformers",
    ],
    ["hydra_preempt.cli"],
]


def layer_of(name: str) -> tuple[int, str]:
    for rank, owners in enumerate(LAYERS):
        for owner in owners:
            if name == owner or name.startswith(owner + "."):
                return rank, owner
    raise AssertionError(f"{name} is in no layer of LAYERS: add it")


def test_no_import_runs_upward_or_sideways():
    for name, targets in graph().items():
        if name == FACADE:
            continue
        rank, owner = layer_of(name)
        for target in targets:
            if target == FACADE:
                continue
            target_rank, target_owner = layer_of(target)
            assert target_owner == owner or target_rank < rank, (
                f"{name} (layer {rank}) imports {target} (layer {target_rank}): imports run downward only"
            )
