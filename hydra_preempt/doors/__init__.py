"""The front doors, each a thin adapter over the core: submitit (PreemptibleTask, preemptible_executor),
the executor settings they share with the Hydra launcher (settings), the Hydra sweep state
(hydra_sweep) and the Snakemake experiment grid (snakemake_grid). The core never imports a door."""
