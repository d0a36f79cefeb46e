# Training, one job per experiment. The declared output is the run's result.json, which the
# session writes (atomically) only when training finished. Snakemake deletes a job's declared
# outputs whenever the job starts, so nothing else of the run directory is declared: the
# checkpoints and the run log beside result.json survive every restart and requeue.
import re
import sys

from hydra_preempt.doors.snakemake_grid import train_command, train_resources


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
        **train_resources(config),
    # python exits 75 after a preemption (the job is requeued, by SLURM or by itself).
    # hydra_preempt.doors.workflow runs the script in that same process as
    # `SCRIPT hydra.run.dir=RUN_DIR KEY=VALUE ...` and checks that a finished run wrote result.json.
    shell:
        train_command(config)
        + "{params.python:q} -m hydra_preempt.doors.workflow {params.script:q} {params.run_dir:q} {params.overrides:q}"
