"""On a GPU: the estimator's peak against torch.cuda.max_memory_allocated of a real step (bench/memory_truth.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory_truth.py"
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", [
    ("llama-150m", "amp-bf16", "full", 2, False),
    ("llama-400m", "bf16", "full", 2, True),
])
def test_predicted_peak_within_5_percent_of_measured(config):
    sys.path.insert(0, str(BENCH.parent))
    from memory_truth import predict

    done = subprocess.run([sys.executable, str(BENCH), "--one", json.dumps(config)], capture_output=True, text=True,
                          timeout=300, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])["max_allocated"]
    predicted = predict(*config)["peak_bytes"]
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)
