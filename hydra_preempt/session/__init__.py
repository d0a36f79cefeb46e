"""The session core: the Session a training function talks to (api), the step-boundary decision
(boundary), what a checkpoint holds (state), run() and the job context (runner), signal handling
(signals) and divergence detection (divergence)."""
