"""Everything that talks to SLURM: commands (scontrol, sacct, sbatch), the job's environment, what a
stop was and who requeues it (pure), and the policy that applies it after a run."""
