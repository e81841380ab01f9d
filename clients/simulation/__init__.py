"""``fedopt simulate``: many virtual clients on one machine, trained by the round engine's in-process executors."""
