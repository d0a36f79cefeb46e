# Training, one job per experiment. The declared output is the run's result.json, which the
# session writes (atomically) only when training finished. Snakemake deletes a job's declared
# outputs whenever the job starts, so nothing else of the run directory is declared: the
# checkpoints and the run log beside result.json survive every restart and requeue.
import re
import sys

# Several tasks (nodes x tasks_per_node): the job's command is `srun python ...`, which starts them as
# the ranks of one run (the session forms their process group). The resource `mpi` tells the SLURM
# executor so: it submits --ntasks=N and does not wrap the command in its own `srun -n1`.
TASKS = config["nodes"] * config["tasks_per_node"]
RANKS = {"mpi": "srun", "tasks": TASKS, "nodes": config["nodes"]} if TASKS > 1 else {}


rule train:
    output:
        result=f"{RUNS}/{{experiment}}/result.json",
    params:
        run_dir=lambda wc: f"{RUNS}/{wc.experiment}",
        overrides=lambda wc: list(EXPERIMENTS[wc.experiment].overrides),
        python=sys.executable,
        script=config["train_script"],
    wildcard_constraints:
        experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    threads: config["cpus_per_task"]
    resources:
        runtime=config["runtime_min"],
        cpus_per_task=config["cpus_per_task"],
        mem_mb=config["mem_mb"],
        gpu=config["gpus"],
        # The time-limit warning. TERM, not USR2: inside the job step it also reaches the job's inner
        # snakemake, which exits on USR2 but waits for its running job on TERM.
        # --open-mode=append: a requeued job appends to its log instead of truncating the first run's
        slurm_extra=f"--signal=TERM@{config['signal_lead_s']} --open-mode=append",
        **RANKS,
    # `exec`: the shell becomes python, so no shell layer can die of the preemption SIGTERM while
    # python saves. python exits 75 after a preemption (the job is requeued, by SLURM or by itself).
    # hydra_preempt.doors.workflow runs the script in that same process as
    # `SCRIPT hydra.run.dir=RUN_DIR KEY=VALUE ...` and checks that a finished run wrote result.json.
    # With several tasks, `exec srun`: srun passes the signal on to every task, and waits for them.
    shell:
        ("exec srun " if TASKS > 1 else "exec ")
        + "{params.python:q} -m hydra_preempt.doors.workflow {params.script:q} {params.run_dir:q} {params.overrides:q}"
