"""Hydra launcher plugin of hydra_preempt: hydra/launcher=preempt_slurm and hydra/launcher=preempt_local."""
