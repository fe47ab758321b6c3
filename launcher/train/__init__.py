"""The shared training entrypoint: `python -m launcher.train --job-dir DIR` on every rank (torchrun starts it)."""
