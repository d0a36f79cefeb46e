"""Why a job ended and whether to restart it: the failure table (data) and two pure functions.

The table (failures.yaml in this package, or a user's file: `failures.table`)
lists the classes in order, each with the rules that recognise it and its
restart policy. `classify(slurm_state, exit_code, last_stop, log_text)` gives
the class the evidence shows, taken in order (the run's own stop and SLURM's
state, the exit code, then the end of the log only for a run that died
without a word), with the evidence; `decide(...)` says
whether a job of that class runs again, given how many times it already did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError

CLASSES = (
    "finished",
    "preempted",
    "timeout",
    "cancelled",
    "node_fail",
    "oom_host",
    "cuda_oom",
    "nccl",
    "peer_lost",
    "cuda_error",
    "hang",
    "diverged",
    "user_exception",
    "launch_failure",
    "killed",
)
UNKNOWN = "unknown"  # nothing in the table matched: not restarted
NO_STOP = "none"  # the `last_stop` of a start that wrote no stop: its process died without a word
_KEYS = {"name", "last_stops", "slurm_states", "exit_codes", "log_patterns", "restart", "max_restarts", "backoff_s"}
# Evidence quotes at most this much of a log line.
_QUOTE = 200
# The log patterns see SLURM's own lines among this many last lines of a run's log, and the
# program's last words: its last PROGRAM_LAST_LINES lines (`log_tail`).
LOG_TAIL_LINES = 40
PROGRAM_LAST_LINES = 10
# A line SLURM's programs wrote into the job's log (slurmstepd's errors, srun's task reports)
# (slurmstepd-NODE: where SLURM runs several slurmd per host)
_SCHEDULER_LINE = re.compile(r"^\s*(slurmstepd(-\S+)?|srun|salloc|sbatch)(\[\d+\])?: ")
# Lines of a C++ exception's trace, which follow its message (NCCL's watchdog abort): not last words
_NATIVE_FRAME = re.compile(r"^\s*(\[rank\d+\]:\s*)?(frame #\d+:|Exception raised from )")


@dataclass(frozen=True)
class FailureClass:
    name: str
    last_stops: tuple[str, ...] = ()
    slurm_states: tuple[str, ...] = ()
    exit_codes: tuple[int, ...] = ()
    log_patterns: tuple[re.Pattern[str], ...] = ()
    restart: bool = False
    max_restarts: Optional[int] = None  # None: no budget of its own (preemptions and time limits have theirs)
    backoff_s: float = 0.0

    def log_evidence(self, log_text: str) -> str | None:
        """The line of `log_text` a log pattern of this class matches, quoted, or None."""
        for pattern in self.log_patterns:
            found = pattern.search(log_text)
            if found:
                start = log_text.rfind("\n", 0, found.start()) + 1
                end = log_text.find("\n", found.end())
                line = log_text[start : end if end >= 0 else len(log_text)].strip()
                return f"log: {line[:_QUOTE]}"
        return None


def log_tail(log_text: str) -> str:
    """What of a run's log may explain its end: SLURM's own lines (slurmstepd's, srun's) among its last
    LOG_TAIL_LINES non-blank lines, and the program's last words, its last PROGRAM_LAST_LINES lines
    (the final traceback's exception, NCCL's abort); never a line the program printed and lived on
    after (a recovered CUDA out-of-memory, a data sample that quotes a kernel message)."""
    lines = [line for line in log_text.splitlines() if line.strip()][-LOG_TAIL_LINES:]
    scheduler = [line for line in lines if _SCHEDULER_LINE.match(line)]
    own = [line for line in lines if not _SCHEDULER_LINE.match(line) and not _NATIVE_FRAME.match(line)]
    program = own[-PROGRAM_LAST_LINES:]
    return "\n".join(scheduler + program)


@dataclass(frozen=True)
class FailureTable:
    classes: tuple[FailureClass, ...]
    source: str  # where it was read from, for messages

    @classmethod
    def load(cls, path: str | Path | None = None) -> FailureTable:
        """The shipped table, or the user's file at `path`; ConfigError (one line, naming the entry) if malformed."""
        if path is None:
            text = resources.files(__package__).joinpath("failures.yaml").read_text(encoding="utf-8")
            return cls.parse(text, "hydra_preempt/slurm/failures.yaml")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"failure table {path} cannot be read: {e.strerror or e}") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str) -> FailureTable:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or set(data) != {"classes"} or not isinstance(data["classes"], list):
            raise ConfigError(f"{source}: must be a mapping with one key, classes: a list of failure classes")
        classes = tuple(_parse_class(entry, f"{source}: classes[{i}]") for i, entry in enumerate(data["classes"]))
        names = [c.name for c in classes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{source}: class {repeated[0]} is listed more than once")
        return cls(classes, source)

    def get(self, name: str) -> FailureClass | None:
        return next((c for c in self.classes if c.name == name), None)


def _parse_class(entry: Any, where: str) -> FailureClass:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping, got {entry!r}")
    name = entry.get("name")
    if name not in CLASSES:
        raise ConfigError(f"{where}: name must be one of {', '.join(CLASSES)}, got {name!r}")
    where = f"{where} ({name})"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")

    def strings(key: str) -> tuple[str, ...]:
        values = entry.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{where}: {key} must be a list of non-empty strings, got {values!r}")
        return tuple(values)

    codes = entry.get("exit_codes", [])
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise ConfigError(f"{where}: exit_codes must be a list of integers, got {codes!r}")
    patterns = []
    for i, text in enumerate(strings("log_patterns")):
        try:
            patterns.append(re.compile(text, re.MULTILINE))
        except re.error as e:
            raise ConfigError(f"{where}: log_patterns[{i}] {text!r} is not a regular expression: {e}") from None
    restart = entry.get("restart")
    if not isinstance(restart, bool):
        raise ConfigError(f"{where}: restart must be true or false, got {restart!r}")
    max_restarts = entry.get("max_restarts")
    if max_restarts is not None and (
        isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0
    ):
        raise ConfigError(f"{where}: max_restarts must be an integer >= 0 or null, got {max_restarts!r}")
    backoff = entry.get("backoff_s", 0)
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 <= backoff < float("inf"):
        raise ConfigError(f"{where}: backoff_s must be a number >= 0, got {backoff!r}")
    return FailureClass(
        name,
        strings("last_stops"),
        strings("slurm_states"),
        tuple(codes),
        tuple(patterns),
        restart,
        max_restarts,
        float(backoff),
    )


def classify(
    table: FailureTable,
    slurm_state: str | None,
    exit_code: int | None,
    last_stop: str | None,
    log_text: str = "",
) -> tuple[str, str]:
    """(class, evidence) of a job's end, the evidence taken in order:

    1. what the run recorded (its stop) and SLURM's state: the first class in table order that
       lists either;
    2. the exit code;
    3. only when neither the run nor SLURM says why (a start without a stop, NO_STOP: its process
       died without a word; or no start at all, None): the log's patterns over its last lines
       (`log_tail`), never a line printed mid-run (an error the run recovered from);
    4. a start without a stop that nothing explains: the class that lists NO_STOP (killed).

    `slurm_state` as sacct shows it ("CANCELLED by 1000"), None outside SLURM; `last_stop` the
    reason of the run log's stop of this attempt (NO_STOP if it started and wrote none; None if
    nothing is known, e.g. it never started); `log_text` the job's output of this attempt."""
    stop = last_stop if last_stop != NO_STOP else None
    state = slurm_state.split()[0] if slurm_state else None
    for failure in table.classes:
        if stop is not None and stop in failure.last_stops:
            return failure.name, f"run log: last stop {stop}"
        if state is not None and state in failure.slurm_states:
            return failure.name, f"SLURM state {state}"
    for failure in table.classes:
        if exit_code is not None and exit_code in failure.exit_codes:
            return failure.name, f"exit code {exit_code}"
    if stop is None:  # died without a word, or never started: the end of its log may say why
        tail = log_tail(log_text)
        for failure in table.classes:
            evidence = failure.log_evidence(tail)
            if evidence is not None:
                return failure.name, evidence
    for failure in table.classes:
        if last_stop == NO_STOP and NO_STOP in failure.last_stops:
            return failure.name, "run log: this start wrote no stop"
    return (
        UNKNOWN,
        f"no rule of {table.source} matches (state {slurm_state}, exit code {exit_code}, last stop {last_stop})",
    )


def classify_exception(table: FailureTable, trace: str) -> tuple[str, str]:
    """(class, evidence) of an exception out of the training function, inside the job: the log
    patterns over the end of its traceback (an NCCL error, a CUDA out-of-memory), else the class of
    a `failed` stop (user_exception)."""
    name, evidence = classify(table, None, None, None, trace)
    return (name, evidence) if name != UNKNOWN else classify(table, None, None, "failed")


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    reason: str
    backoff_s: float = 0.0


def decide(table: FailureTable, name: str, attempt: int) -> RestartDecision:
    """Restart after the `attempt`-th failure of class `name` (1: the first)?

    'retry budget exhausted (attempt 4/3)' once attempts exceed the class's max_restarts."""
    failure = table.get(name)
    if failure is None or not failure.restart:
        return RestartDecision(False, f"{name}: not restarted")
    if failure.max_restarts is not None and attempt > failure.max_restarts:
        return RestartDecision(False, f"{name}: retry budget exhausted (attempt {attempt}/{failure.max_restarts})")
    budget = f"/{failure.max_restarts}" if failure.max_restarts is not None else ""
    return RestartDecision(True, f"{name}: restart (attempt {attempt}{budget})", failure.backoff_s)
