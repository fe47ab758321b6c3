"""The pipeline stages' receive buffers (launcher.train.pipeline_stage): on two gloo ranks, interleaved 1F1B over
4 stages (v 2) and 8 microbatches gives the same gradients with llaunch's stage as with torch's, for two steps,
while a rank's stages hold the inputs of the microbatches in flight and one gradient at a time, not torch's one
buffer per microbatch each way for the whole run. About 15 s."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.dist

MICROBATCHES = 8
WORKER = """
import gc, json, sys, weakref, torch, torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
from launcher.train.pipeline_stage import OnDemandReceiveStage

dist.init_process_group("gloo")
rank, pp, microbatches = dist.get_rank(), 2, int(sys.argv[2])


seen = []  # weak references to every received tensor, to count those still alive anywhere


def held(stages):
    # Distinct storages of received tensors a rank's stages still reference: their receive infos' buffers and
    # the inputs their forward cache keeps for backward.
    tensors = []
    for stage in stages:
        infos = [i for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()) for i in infos]
        tensors += [i.buffer for i in infos if i.buffer is not None]
        if not stage.is_first:
            tensors += [t for _, inputs in stage.fwd_cache.values() for t in inputs]
    seen.extend(weakref.ref(t) for t in tensors)
    return len({t.untyped_storage().data_ptr() for t in tensors})


def alive():
    gc.collect()
    return len({t.untyped_storage().data_ptr() for t in (ref() for ref in seen) if t is not None})


def train(kind):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2 * pp)]
    ids = [rank, rank + pp]
    stages = [kind(blocks[s], s, 2 * pp, torch.device("cpu"), group=dist.group.WORLD) for s in ids]
    most = []
    for stage in stages:  # count after every forward and backward of a microbatch
        for name in ("forward_one_chunk", "backward_one_chunk"):
            run = getattr(stage, name)
            def counted(*args, _run=run, **kwargs):
                out = _run(*args, **kwargs)
                most[-1] = max(most[-1], held(stages))
                return out
            setattr(stage, name, counted)
    schedule = ScheduleInterleaved1F1B(stages, n_microbatches=microbatches,
                                       loss_fn=lambda out, target: ((out - target) ** 2).mean())
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        inputs, target = torch.randn(microbatches, 16, generator=generator), torch.randn(microbatches, 16, generator=generator)
        most.append(0)
        schedule.step(*((inputs,) if rank == 0 else ()), target=target if rank == pp - 1 else None)
    grads = [p.grad.flatten().tolist() for s in ids for p in blocks[s].parameters()]
    return {"grads": grads, "most_held": most, "held_after": held(stages), "alive_after": alive()}


result = {"torch": train(PipelineStage), "llaunch": train(OnDemandReceiveStage)}
with open(f"{sys.argv[1]}.{rank}.json", "w") as out:
    json.dump(result, out)
dist.destroy_process_group()
"""


def test_stages_hold_what_is_in_flight_and_train_as_torchs(tmp_path, torchrun_workers):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun_workers(script, str(tmp_path / "result"), str(MICROBATCHES))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        ours, theirs = result["llaunch"], result["torch"]
        assert ours["grads"] == theirs["grads"]
        # torch: every microbatch's input (on the 3 stages after the first) and gradient (the 3 before the last):
        # 3 of each rank's 2 stages x 2 ways
        assert theirs["held_after"] == 3 * MICROBATCHES
        # llaunch: the inputs in flight (at most the schedule's warm-up, 2(p - 1 - r) + (v - 1)p + 1), the next
        # one received ahead and one gradient; nothing between steps.
        warm_up = 2 * (2 - 1 - rank) + (2 - 1) * 2 + 1
        assert ours["held_after"] == ours["alive_after"] == 0  # nor does anything else keep them
        assert all(0 < most <= warm_up + 2 for most in ours["most_held"]), ours["most_held"]
