"""A minimal rank program around the real engines and the Checkpointer: a tiny Llama with attention dropout,
grad accumulation, eval.

Run by tests/distributed/test_resume.py under torchrun. It drives the engine (launcher.train.engines) and the
checkpoint and preemption modules exactly as the training loop does: resume at start, `should_stop()` + save
at each step boundary, exit with REQUEUE_EXIT_CODE after a preemption checkpoint, final weights written to
safetensors. Test-only hooks (environment): SIGNAL_AT="step:micro:rank" signals that rank inside
accumulation, SIGNAL_IN_EVAL="step:rank" inside an eval, KILL_IN_SAVE=step kills rank 0 with SIGKILL after
its shards are written but before the checkpoint is published, STEP_SLEEP seconds per step.
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

from launcher.config import TrainingSection
from launcher.errors import LaunchError
from launcher.planning.plan import Plan
from launcher.errors import REQUEUE_EXIT_CODE
from launcher.train.checkpoint import Checkpointer, resolve_resume_on_every_rank
from launcher.train.device_mesh import RankMeshes
from launcher.train.engines import build_engine
from launcher.train.fingerprint import Fingerprint
from launcher.train.preemption import PreemptionHandler
from tests.tiny_run import TINY_LLAMA

VOCAB, SEQ, MICRO, GLOBAL_BATCH = 64, 16, 2, 8
ARCHITECTURE = {**TINY_LLAMA, "vocab_size": VOCAB, "max_position_embeddings": SEQ, "attention_dropout": 0.1}


def accumulation(world):
    """Like the planner: the global batch stays fixed and accumulation absorbs a change of world size."""
    return GLOBAL_BATCH // (MICRO * world)


def build(strategy):
    """The engine the loop would build for this strategy, on a random-init tiny Llama (same seed on every rank).
    hsdp: every rank its own "node" of one process, the (world, 1) mesh that shards least."""
    from transformers import LlamaConfig, LlamaForCausalLM

    world = dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**ARCHITECTURE, use_cache=False), attn_implementation="eager",
                                          dtype=torch.float32)
    nodes, per_node = (world, 1) if strategy == "hsdp" else (1, world)
    plan = Plan(model="tiny", strategy=strategy, precision="fp32", optimizer="adamw_torch", micro_batch=MICRO,
                gradient_accumulation_steps=accumulation(world), seq_len=SEQ, nodes=nodes, gpus_per_node=per_node,
                device="cpu")
    training = TrainingSection(learning_rate=3e-3, weight_decay=0.01, optim="adamw_torch", max_grad_norm=0.0)
    return build_engine(model, plan, training, torch.device("cpu"), {}, RankMeshes.build(plan.parallel, "cpu"))


def batch(step, micro, rank, world):
    """The samples of (step, micro, rank): a pure function of position, as the resumable sampler gives."""
    g = torch.Generator().manual_seed(((step * accumulation(world) + micro) * world + rank) * 7919)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
    return {"input_ids": tokens, "labels": tokens}


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
    """The consolidated weights, as rank 0 gathers them (every rank takes part)."""
    from safetensors.torch import save_file

    state = engine.full_state_dict()
    if dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


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
    fingerprint = Fingerprint.build(model_config=ARCHITECTURE, tokenizer="tok-v1",
                                    data=args.data, global_batch=GLOBAL_BATCH,
                                    schedule={"max_steps": args.steps})
    step, eval_loss = 0, None
    resume = resolve_resume_on_every_rank(args.output, None, no_resume=False, overwrite=False)
    if resume:
        state = ckpt.load(resume, engine, fingerprint)
        step, eval_loss = state["train_state"]["global_step"], state["train_state"]["eval_loss"]
        if rank == 0:
            print(f"RESUMED step={step}", flush=True)
        if args.dump_loaded:
            dump_full_model(engine, args.dump_loaded)
    sleep = float(os.environ.get("STEP_SLEEP", "0"))

    def save():
        ckpt.save(step, engine, {"train_state": {"global_step": step, "eval_loss": eval_loss}},
                  fingerprint=fingerprint, metrics={"eval_loss": eval_loss} if eval_loss is not None else None,
                  documents={"config.yaml": f"strategy: {args.strategy}\n"})

    while step < args.steps:
        engine.train(True)
        accum = accumulation(world)
        for micro in range(accum):
            maybe_signal("SIGNAL_AT", step, micro, rank)
            with engine.accumulating(final=micro == accum - 1):
                inputs = {**batch(step, micro, rank, world), "num_items_in_batch": accum * MICRO * (SEQ - 1)}
                engine.backward(engine.forward(inputs).loss)
        engine.step(0.0)
        step += 1
        if step % args.eval_steps == 0:
            engine.train(False)
            with torch.no_grad():
                maybe_signal("SIGNAL_IN_EVAL", step, rank)
                value = engine.forward(batch(10_000, 0, 0, 1)).loss.detach()
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
            # Without the interpreter's teardown, as llaunch's ranks end (launcher/train/__main__.exit_now): it
            # has aborted a finished process under load ("terminate called without an active exception").
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(REQUEUE_EXIT_CODE)
    ckpt.wait()
    dist.barrier()
    dump_full_model(engine, Path(args.output) / "final" / "model.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
