"""The engine: the thread that owns MLX, its token loop and batching, the scheduler in front
of it and the prefix cache behind it."""
