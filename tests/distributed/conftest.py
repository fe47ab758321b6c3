"""Run a worker script under torchrun with 2 gloo processes on CPU (the dist tests' one launcher)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_torchrun_workers(script: Path, *args: str, nproc: int = 2, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="session")
def torchrun_workers():
    return run_torchrun_workers


@pytest.fixture(scope="session")
def word_text(tmp_path_factory) -> Path:
    """12,000 words of code-like text (seeded): the small corpus the distributed tests train on."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "(", ")", ":", "=", "+", "\n", "    "]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12000)))
    return path
