"""A run directory on disk: preparing it before any process starts, its checkpoints, its run lock."""
