"""launcher.planning.memory's model-state terms for ZeRO-1/2/3 against what DeepSpeed allocates on each of 2 gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.planning.memory import estimate
from launcher.planning.plan import TrainSetup
from launcher.planning.models import load_model_spec

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("zero_states_worker.py")
STRATEGIES = ["zero1", "zero2", "zero3"]
TOLERANCE = 0.05  # DeepSpeed pads each flat partition to an alignment boundary: well under 1 % at this width


@pytest.fixture(scope="module")
def measured(tmp_path_factory, torchrun_workers, word_text):
    out = tmp_path_factory.mktemp("zero-states")
    torchrun_workers(WORKER, "--out", str(out), "--data", str(word_text), *STRATEGIES)
    return [json.loads((out / f"states-rank{rank}.json").read_text()) for rank in (0, 1)]


def estimated(strategy: str):
    from tests.distributed.zero_states_worker import SMALL

    spec = load_model_spec("tinyllama-1.1b", {**SMALL, "vocab_size": 300})
    return spec, estimate(spec, TrainSetup(strategy=strategy, precision="fp32", gpus_per_node=2, micro_batch=2,
                                           seq_len=32, device="cpu"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_state_terms_match_deepspeed_partitions(measured, strategy):
    spec, memory = estimated(strategy)
    for rank, states in enumerate(measured):
        got = states[strategy]
        assert got["params"] == spec.num_params  # the spec describes the model DeepSpeed built
        actual = {"weights": got["weights"], "optimizer": got["optimizer_states"] + got["master"]}
        if strategy != "zero1":  # ZeRO-1's estimate is the full gradients of backward; by the step only a partition is left
            actual["grads"] = got["grads"]
        for term, value in actual.items():
            assert abs(memory[term] - value) <= TOLERANCE * value, (
                f"{strategy} rank {rank} {term}: estimated {memory[term]} B, DeepSpeed holds {value} B ({got})")
