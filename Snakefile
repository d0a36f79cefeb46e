# snakemake --profile local : the experiments of experiments.yaml on this machine
# snakemake --profile slurm : the same on SLURM's preemptible QoS (your default account and partition, or set them in slurm/)
# The rules are hydra_preempt's, from the installed package (hydra-preempt workflow path).
from hydra_preempt.doors.workflow import SNAKEFILE

configfile: "experiments.yaml"


include: str(SNAKEFILE)


rule default:  # run everything without naming a target (Snakemake ignores an included file's default)
    input:
        rules.all.input,
    default_target: True
