"""The failure table: every pattern on a real-looking excerpt, precedence, the restart policy, a malformed table."""

import pytest

from hydra_preempt.errors import ConfigError
from hydra_preempt.slurm.failures import (
    LOG_TAIL_LINES,
    NO_STOP,
    PROGRAM_LAST_LINES,
    UNKNOWN,
    FailureTable,
    classify,
    classify_exception,
    decide,
)

TABLE = FailureTable.load()

CUDA_OOM = """\
step 1200 loss 2.31
Traceback (most recent call last):
  File "/home/u/train.py", line 88, in train
    loss.backward()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity; \
77.02 GiB already allocated; 3.06 MiB free; 78.10 GiB reserved in total by PyTorch)
"""
CUDA_OOM_OLD = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"
NCCL = """\
[rank3]: Traceback (most recent call last):
[rank3]: torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, \
unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5
"""
NCCL_TIMEOUT = (
    "[rank1]:[E1127 10:02:11.812000 ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog caught collective operation "
    "timeout: WorkNCCL(SeqNum=88812, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600081 "
    "milliseconds before timing out."
)
NCCL_REMOTE = "gpu-12:31337:31420 [0] NCCL WARN NET/IB : Got completion from peer with error 12, remote process exited"
DEVICE_ASSERT = """\
../aten/src/ATen/native/cuda/Loss.cu:250: nll_loss_forward_reduce_cuda_kernel_2d: block: [0,0,0], thread: [5,0,0] \
Assertion `t >= 0 && t < n_classes` failed.
RuntimeError: CUDA error: device-side assert triggered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
"""
ILLEGAL = "RuntimeError: CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA`"
ECC = "RuntimeError: CUDA error: uncorrectable ECC error encountered"
HOST_OOM = (
    "slurmstepd: error: Detected 1 oom_kill event in StepId=4242.0. Some of the step tasks have been OOM Killed.\n"
    "srun: error: gpu-07: task 0: Out Of Memory"
)
LAUNCH = "srun: error: Unable to create step for job 4242: Job/step already completing or completed"
EXECVE = "slurmstepd: error: execve(): python: No such file or directory"
NODE_FAIL = "slurmstepd: error: *** JOB 4242 ON gpu-07 CANCELLED AT 2026-11-27T10:00:00 DUE TO NODE FAILURE, SEE SLURMCTLD LOG ***"
GLOO = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:52946. This is typically caused by a remote worker crashing."
)
GLOO_RESET = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer"
HANG = (
    "hydra_preempt: hang: no progress for 612 s in the step after step 1200; stacks in hang-stacks-20261127T100000.txt"
)


@pytest.mark.parametrize(
    ("log_text", "expected", "quoted"),
    [
        (CUDA_OOM, "cuda_oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"),
        (CUDA_OOM_OLD, "cuda_oom", "RuntimeError: CUDA out of memory"),
        (NCCL, "nccl", "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970"),
        (NCCL_TIMEOUT, "nccl", "Watchdog caught collective operation timeout"),
        (NCCL_REMOTE, "nccl", "remote process exited"),
        (DEVICE_ASSERT, "cuda_error", "RuntimeError: CUDA error: device-side assert triggered"),
        (ILLEGAL, "cuda_error", "an illegal memory access was encountered"),
        (ECC, "cuda_error", "uncorrectable ECC error encountered"),
        (HOST_OOM, "oom_host", "Detected 1 oom_kill event in StepId=4242.0"),
        (LAUNCH, "launch_failure", "Unable to create step for job 4242"),
        (EXECVE, "launch_failure", "execve(): python"),
        (NODE_FAIL, "node_fail", "DUE TO NODE FAILURE"),
        (HANG, "hang", "no progress for 612 s"),
        (GLOO, "peer_lost", "Connection closed by peer"),
        (GLOO_RESET, "peer_lost", "Connection reset by peer"),
    ],
)
def test_each_pattern_recognises_a_real_excerpt_of_a_failed_job(log_text, expected, quoted):
    name, evidence = classify(TABLE, "FAILED", 1, NO_STOP, log_text)  # a job that died without a word
    assert name == expected
    assert evidence.startswith("log: ") and quoted in evidence


@pytest.mark.parametrize(
    ("state", "exit_code", "last_stop", "expected", "evidence"),
    [
        ("COMPLETED", 0, "finished", "finished", "run log: last stop finished"),
        ("PREEMPTED", 0, None, "preempted", "SLURM state PREEMPTED"),
        ("TIMEOUT", 0, None, "timeout", "SLURM state TIMEOUT"),
        ("NODE_FAIL", 0, None, "node_fail", "SLURM state NODE_FAIL"),
        ("OUT_OF_MEMORY", 0, None, "oom_host", "SLURM state OUT_OF_MEMORY"),
        ("FAILED", 76, None, "hang", "exit code 76"),
        ("FAILED", 3, "diverged", "diverged", "run log: last stop diverged"),
        ("CANCELLED by 1000", 0, None, "cancelled", "SLURM state CANCELLED"),
        ("FAILED", 1, "failed", "user_exception", "run log: last stop failed"),
        (None, 130, "cancelled", "cancelled", "run log: last stop cancelled"),
        ("FAILED", 9, "none", "killed", "run log: this start wrote no stop"),
        ("CANCELLED by 0", 0, "none", "cancelled", "SLURM state CANCELLED"),
        ("PREEMPTED", 0, "none", "preempted", "SLURM state PREEMPTED"),
    ],
)
def test_states_exit_codes_and_stops_without_a_log(state, exit_code, last_stop, expected, evidence):
    assert classify(TABLE, state, exit_code, last_stop, "") == (expected, evidence)


def test_the_end_of_the_log_tells_why_a_job_died_without_a_word_and_a_node_failure_outranks_it():
    assert classify(TABLE, "FAILED", 1, NO_STOP, "ValueError: bad batch\n" + NCCL)[0] == "nccl"
    assert classify(TABLE, "NODE_FAIL", 1, None, NCCL)[0] == "node_fail"
    assert classify(TABLE, "NODE_FAIL", 1, NO_STOP, NCCL)[0] == "node_fail"


def test_nothing_matching_is_unknown_and_not_restarted():
    name, evidence = classify(TABLE, "RUNNING", None, None, "")
    assert name == UNKNOWN and "no rule" in evidence
    assert not decide(TABLE, name, 1).restart


def test_restart_policy_defaults():
    for name in ("node_fail", "nccl", "peer_lost", "hang", "launch_failure", "killed"):
        assert decide(TABLE, name, 1).restart, name
    for name in ("oom_host", "cuda_oom", "diverged", "cancelled", "user_exception", "cuda_error", "finished"):
        decision = decide(TABLE, name, 1)
        assert not decision.restart and "not restarted" in decision.reason, name


def test_a_class_restarts_within_its_budget_then_stops_with_the_reason():
    ok = decide(TABLE, "nccl", 3)
    assert ok.restart and ok.reason == "nccl: restart (attempt 3/3)" and ok.backoff_s == 30
    spent = decide(TABLE, "nccl", 4)
    assert not spent.restart and spent.reason == "nccl: retry budget exhausted (attempt 4/3)"


def test_the_monitors_own_restarts_of_preemptions_and_time_limits_have_a_budget():
    # the stop protocol's requeues never come here; a run that ended PREEMPTED or TIMEOUT without requeueing does
    assert decide(TABLE, "timeout", 3).restart and not decide(TABLE, "timeout", 4).restart
    assert decide(TABLE, "preempted", 4).reason == "preempted: retry budget exhausted (attempt 4/3)"


def test_a_cancelled_job_is_cancelled_whatever_its_log_says_and_a_stop_outranks_srun_noise():
    nccl_lines = NCCL + NCCL_TIMEOUT  # a stuck job is cancelled for a reason
    assert classify(TABLE, "CANCELLED by 1000", 0, "cancelled", nccl_lines)[0] == "cancelled"
    assert classify(TABLE, "CANCELLED by 1000", 0, "none", nccl_lines)[0] == "cancelled"
    killed_ranks = "srun: error: vm: tasks 1-3: Killed\n"  # srun ends the other ranks after rank 0 failed
    assert classify(TABLE, "FAILED", 1, "failed", killed_ranks)[0] == "user_exception"
    assert classify(TABLE, "FAILED", 9, "none", killed_ranks) == ("killed", "run log: this start wrote no stop")


def test_a_users_table_replaces_the_shipped_one(tmp_path):
    path = tmp_path / "failures.yaml"
    path.write_text(
        "classes:\n  - name: nccl\n    log_patterns: ['my fabric broke']\n    restart: true\n    max_restarts: 1\n"
    )
    table = FailureTable.load(path)
    assert classify(table, "FAILED", 1, NO_STOP, "my fabric broke") == ("nccl", "log: my fabric broke")
    assert classify(table, "FAILED", 1, NO_STOP, NCCL)[0] == UNKNOWN
    assert not decide(table, "nccl", 2).restart


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("classes: [", "not valid YAML"),
        ("- name: nccl", "must be a mapping with one key, classes"),
        ("classes:\n  - name: gpu_on_fire\n    restart: true", "classes[0]: name must be one of finished"),
        ("classes:\n  - name: nccl\n    restart: yes please", "classes[0] (nccl): restart must be true or false"),
        (
            "classes:\n  - name: nccl\n    restart: true\n    log_patterns: ['NCCL (']",
            "log_patterns[0] 'NCCL (' is not",
        ),
        ("classes:\n  - name: nccl\n    restart: true\n    max_restarts: -1", "max_restarts must be an integer >= 0"),
        ("classes:\n  - name: nccl\n    restart: true\n    exit_codes: ['1']", "exit_codes must be a list of integers"),
        ("classes:\n  - name: nccl\n    restart: true\n    pattern: x", "unknown key(s) pattern"),
        (
            "classes:\n  - {name: hang, restart: true}\n  - {name: hang, restart: false}",
            "hang is listed more than once",
        ),
    ],
)
def test_a_malformed_table_is_one_line_naming_the_entry(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        FailureTable.load(path)
    assert message in str(e.value) and str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_missing_table_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        FailureTable.load(tmp_path / "nope.yaml")


# A run's log up to its end: steps, a recovered error printed mid-run, more steps.
STEPS = "".join(f"step {i} loss 0.{i:03d}\n" for i in range(200))
RECOVERED_CUDA_OOM = (
    "warning: batch 77 skipped after torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB\n"
)
DATA_SAMPLE = "sample 3121: 'kernel: Out of memory: Killed process 4242 (python) total-vm:...'\n"
RECOVERED_LAUNCH = "retrying the kernel after RuntimeError: CUDA error: unspecified launch failure\n"
RECOVERED_NCCL = "[rank1]: retrying all_reduce after torch.distributed.DistBackendError: NCCL error in: ...\n"
DISK_FULL = "hydra_preempt: checkpoint of step 400 could not be written: [Errno 28] No space left on device\n"


def mid_run(line):
    return STEPS + line + STEPS


@pytest.mark.parametrize(
    ("state", "exit_code", "last_stop", "log_text", "expected"),
    [
        # the review's cases: a recovered error printed mid-run never decides
        ("FAILED", 0, NO_STOP, mid_run(RECOVERED_CUDA_OOM), "killed"),
        ("FAILED", 0, NO_STOP, mid_run(DATA_SAMPLE), "killed"),
        ("FAILED", 0, NO_STOP, mid_run(RECOVERED_LAUNCH), "killed"),
        ("FAILED", 1, "failed", mid_run(RECOVERED_NCCL) + DISK_FULL, "user_exception"),
        # a recorded stop is never overruled by log text, even at the end of the log
        ("FAILED", 1, "failed", STEPS + NCCL, "user_exception"),
        ("PREEMPTED", 0, "preempted", STEPS + NCCL_TIMEOUT, "preempted"),
        ("COMPLETED", 0, "finished", STEPS + CUDA_OOM, "finished"),
        ("CANCELLED by 1000", 0, "cancelled", STEPS + NCCL, "cancelled"),
        ("FAILED", 76, "hang", STEPS + NCCL, "hang"),
        ("FAILED", 3, "diverged", STEPS + DEVICE_ASSERT, "diverged"),
        # SLURM's state outranks the log of a run that wrote no stop
        ("OUT_OF_MEMORY", 0, NO_STOP, STEPS + NCCL, "oom_host"),
        ("NODE_FAIL", 0, NO_STOP, STEPS + CUDA_OOM, "node_fail"),
        ("TIMEOUT", 0, NO_STOP, STEPS + HOST_OOM, "timeout"),
        # the exit code, then the end of the log of a run that died without a word
        ("FAILED", 76, NO_STOP, STEPS + CUDA_OOM, "hang"),
        ("FAILED", 0, NO_STOP, STEPS + HOST_OOM, "oom_host"),
        ("FAILED", 1, NO_STOP, STEPS + CUDA_OOM, "cuda_oom"),
        ("FAILED", 1, NO_STOP, STEPS + NCCL, "nccl"),
        ("FAILED", 1, NO_STOP, STEPS + ILLEGAL, "cuda_error"),
        ("FAILED", 0, NO_STOP, STEPS + NODE_FAIL, "node_fail"),
        ("FAILED", 0, NO_STOP, STEPS, "killed"),
        # a job that never started: only its log can say why
        ("FAILED", 1, None, LAUNCH, "launch_failure"),
        ("FAILED", 1, None, STEPS, UNKNOWN),
    ],
)
def test_evidence_in_order_the_runs_stop_and_slurms_state_then_the_exit_code_then_the_logs_end(
    state, exit_code, last_stop, log_text, expected
):
    assert classify(TABLE, state, exit_code, last_stop, log_text)[0] == expected


def steps(count: int) -> str:
    return "".join(f"step {i}\n" for i in range(count))


def test_only_slurms_last_lines_and_the_programs_last_words_are_read():
    """The program's own text decides only as its last words: a killed run (node lost, admin kill) whose
    log shows a recovered CUDA OOM a little earlier is killed and restarted, not cuda_oom; a data
    sample quoting the kernel's OOM message is no host OOM."""
    last = PROGRAM_LAST_LINES - 1
    assert classify(TABLE, "FAILED", 1, NO_STOP, NCCL_REMOTE + "\n" + steps(last))[0] == "nccl"
    assert classify(TABLE, "FAILED", 1, NO_STOP, NCCL_REMOTE + "\n" + steps(last + 1))[0] == "killed"
    assert classify(TABLE, "FAILED", 1, NO_STOP, NCCL_REMOTE + "\n" + steps(last) + "\n\n   \n")[0] == "nccl"
    assert classify(TABLE, "FAILED", 0, NO_STOP, STEPS + RECOVERED_CUDA_OOM + steps(20))[0] == "killed"
    assert classify(TABLE, "FAILED", 0, NO_STOP, STEPS + DATA_SAMPLE + steps(2))[0] == "killed"
    # SLURM's lines count anywhere among the last LOG_TAIL_LINES, after the program's last words too
    slurm_after = HOST_OOM + "\n" + "".join(f"srun: error: gpu-07: task {i}: Killed\n" for i in range(20))
    assert classify(TABLE, "FAILED", 0, NO_STOP, STEPS + slurm_after)[0] == "oom_host"
    assert classify(TABLE, "FAILED", 0, NO_STOP, HOST_OOM + "\n" + steps(LOG_TAIL_LINES))[0] == "killed"


def test_an_exception_inside_the_job_is_classified_from_the_end_of_its_traceback():
    assert classify_exception(TABLE, NCCL) == classify(TABLE, "FAILED", 1, NO_STOP, NCCL)
    assert classify_exception(TABLE, CUDA_OOM)[0] == "cuda_oom"
    assert classify_exception(TABLE, "Traceback (most recent call last):\nValueError: bad batch\n") == (
        "user_exception",
        "run log: last stop failed",
    )


def test_a_connection_reset_in_user_code_is_no_lost_peer():
    trace = "urllib.error.URLError: <urlopen error [Errno 104] Connection reset by peer>\n"
    assert classify_exception(TABLE, trace)[0] == "user_exception"


def test_slurm_lines_of_a_host_with_several_slurmd_and_a_native_trace_after_the_last_words():
    """slurmstepd-NODE: where SLURM runs several slurmd per host; NCCL's abort message is followed by the
    frames of its C++ trace, which are no last words of their own."""
    oom = "slurmstepd-gpu-07: error: Detected 1 oom_kill event in StepId=4242.0. Some of the step tasks have been OOM Killed."
    assert classify(TABLE, "FAILED", 0, NO_STOP, STEPS + oom + "\n")[0] == "oom_host"
    frames = "".join(
        f"[rank1]: frame #{i}: <unknown function> + 0x{i:x} (0x7f in libtorch_cuda.so)\n" for i in range(15)
    )
    abort = f"{NCCL_TIMEOUT}\n[rank1]: Exception raised from checkTimeout at ProcessGroupNCCL.cpp:616\n{frames}"
    assert classify(TABLE, "FAILED", 134, NO_STOP, STEPS + abort)[0] == "nccl"
