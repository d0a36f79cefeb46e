# snakemake --profile slurm           : the experiment grid on the preemptible QoS (profile in ./slurm)
# snakemake --profile workflow/profiles/local : the same workflow on this machine, no cluster
# The grid: workflow/config/experiments.yaml (override with --configfile).
configfile: "workflow/config/experiments.yaml"


include: "workflow/Snakefile"


rule default:
    input:
        rules.all.input,
    default_target: True  # an included file's first rule is no default target
