"""A minimal rank program around the Checkpointer: tiny model with dropout, grad accumulation, eval.

Run by tests/distributed/test_resume.py under torchrun. It exercises the checkpoint and preemption modules
exactly as the training loop does: resume at start, `should_stop()` + save at each step boundary,
exit with REQUEUE_EXIT_CODE after a preemption checkpoint, final weights exported to safetensors.
Test-only hooks (environment): SIGNAL_AT="step:micro:rank" signals that rank inside accumulation,
SIGNAL_IN_EVAL="step:rank" inside an eval, KILL_IN_SAVE=step kills rank 0 with SIGKILL after its
shards are written but before the checkpoint is published, STEP_SLEEP seconds per step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher.errors import LaunchError
from launcher.train.checkpoint import Checkpointer, resolve_resume
from launcher.train.export import export_checkpoint
from launcher.train.fingerprint import Fingerprint
from launcher.train.preemption import REQUEUE_EXIT_CODE, PreemptionHandler

VOCAB, HIDDEN, SEQ, MICRO, GLOBAL_BATCH = 64, 32, 16, 2, 8


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Dropout(0.1)) for _ in range(2)
        )
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class DCPEngine:
    """DDP / FSDP2: model + optimizer through torch.distributed.checkpoint (what engines/ddp|fsdp do)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self._async_group = None

    def backward(self, loss, last_micro):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save_state(self, path, async_save=False):
        import torch.distributed.checkpoint as dcp

        if not async_save:
            dcp.save(self._state(), checkpoint_id=str(path))
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return dcp.async_save(self._state(), checkpoint_id=str(path), process_group=self._async_group)

    def load_state(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class DeepSpeedEngine:
    def __init__(self, engine):
        self.model = self.engine = engine

    def backward(self, loss, last_micro):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def save_state(self, path, async_save=False):
        self.engine.save_checkpoint(str(path), tag="ds")
        return None

    def load_state(self, path):
        self.engine.load_checkpoint(str(path), tag="ds", load_lr_scheduler_states=False)


def accumulation(world):
    """Like the planner: the global batch stays fixed and accumulation absorbs a change of world size."""
    return GLOBAL_BATCH // (MICRO * world)


def build(strategy):
    torch.manual_seed(0)
    model = TinyLM()
    make_opt = lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)  # noqa: E731
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        return DCPEngine(model, make_opt(model.parameters()))
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return DCPEngine(model, make_opt(model.parameters()))
    import deepspeed

    stage = int(strategy[-1])
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accumulation(dist.get_world_size()),
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_opt(model.parameters()), config=config)
    return DeepSpeedEngine(engine)


def batch(step, micro, rank, world):
    """The samples of (step, micro, rank): a pure function of position, as the resumable sampler gives."""
    g = torch.Generator().manual_seed(((step * accumulation(world) + micro) * world + rank) * 7919)
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)


def maybe_signal(var, *coords):
    spec = os.environ.get(var)
    if spec and tuple(int(x) for x in spec.split(":")) == coords:
        os.kill(os.getpid(), signal.SIGTERM)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=5)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--data", default="data-v1")
    p.add_argument("--dump-loaded", help="after resuming, write the full model to this safetensors file")
    args = p.parse_args()
    try:
        train(args)
    except LaunchError as err:
        print(f"llaunch: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def dump_full_model(engine, path):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, path)


def kill_during_save(engine, kill_step):
    """Rank 0 dies like `kill -9` after writing its shards, before the manifest makes them a checkpoint."""
    save_state = engine.save_state

    def save_then_die(path, async_save=False):
        result = save_state(path, async_save)
        if dist.get_rank() == 0 and Path(path).parent.name == f".step-{kill_step}.partial":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    engine.save_state = save_then_die


def train(args):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    preemption = PreemptionHandler().install()
    engine = build(args.strategy)
    if os.environ.get("KILL_IN_SAVE"):
        kill_during_save(engine, int(os.environ["KILL_IN_SAVE"]))
    torch.manual_seed(1234 + rank)  # per-rank stream (dropout) that must survive resume
    ckpt = Checkpointer(args.output, strategy=args.strategy, save_total_limit=2, metric_for_best_model="eval_loss",
                        async_save=args.async_save)
    fingerprint = Fingerprint.build(model_config={"hidden": HIDDEN, "vocab": VOCAB}, tokenizer="tok-v1",
                                    data=args.data, global_batch=GLOBAL_BATCH,
                                    schedule={"max_steps": args.steps})
    step, eval_loss = 0, None
    resume = resolve_resume(args.output, None, no_resume=False, overwrite=False)
    if resume:
        state = ckpt.load(resume, engine, fingerprint)
        step, eval_loss = state["train_state"]["global_step"], state["train_state"]["eval_loss"]
        if rank == 0:
            print(f"RESUMED step={step}", flush=True)
        if args.dump_loaded:
            dump_full_model(engine, args.dump_loaded)
    loss_fn = nn.CrossEntropyLoss()
    sleep = float(os.environ.get("STEP_SLEEP", "0"))

    def save():
        ckpt.save(step, engine, {"train_state": {"global_step": step, "eval_loss": eval_loss}},
                  fingerprint=fingerprint, metrics={"eval_loss": eval_loss} if eval_loss is not None else None,
                  documents={"config.yaml": f"strategy: {args.strategy}\n"})

    while step < args.steps:
        engine.model.train()
        accum = accumulation(world)
        for micro in range(accum):
            maybe_signal("SIGNAL_AT", step, micro, rank)
            tokens = batch(step, micro, rank, world)
            logits = engine.model(tokens[:, :-1])
            loss = loss_fn(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) / accum
            engine.backward(loss, micro == accum - 1)
        engine.step()
        step += 1
        if step % args.eval_steps == 0:
            engine.model.eval()
            with torch.no_grad():
                maybe_signal("SIGNAL_IN_EVAL", step, rank)
                tokens = batch(10_000, 0, 0, 1)
                value = loss_fn(engine.model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
                dist.all_reduce(value)
                eval_loss = value.item() / world
        time.sleep(sleep)
        stop = preemption.should_stop()
        if step % args.save_steps == 0 or stop or step == args.steps:
            save()
        if stop:
            ckpt.wait()
            if rank == 0:
                print(f"PREEMPTED step={step}", flush=True)
            dist.destroy_process_group()
            sys.exit(REQUEUE_EXIT_CODE)
    ckpt.wait()
    dist.barrier()
    if rank == 0:
        export_checkpoint(Path(args.output) / "checkpoints" / f"step-{step}", Path(args.output) / "final")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
