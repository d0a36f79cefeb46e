"""Checkpoints: one atomic, verified directory per checkpoint, retention, and the Checkpointer that owns
the save/load life cycle. Import from the modules: `layout` (read-only, no torch), `store`, `writer`,
`tree`, `retention`, `checkpointer`."""
