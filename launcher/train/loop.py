"""The one training loop: every strategy runs this code; engines only wrap, backward, step and save.

A step = one optimizer update over `gradient_accumulation_steps` micro-batches per rank. The loss of each
micro-batch is the model's summed token loss divided by the token count of the rank's whole accumulation
window (`num_items_in_batch`), so micro 2 x accumulation 2 and micro 4 x 1 give the same gradient.
Nothing forces a host sync inside a step: losses stay on the device until a logging step.

Seams for checkpointing and preemption: `TrainState` is everything besides engine/scheduler state that a
resume needs; restoring belongs at the top of `Trainer.train()` (before the metrics writer opens), and
saving / preemption checks in `Trainer.on_step_end()`, the step boundary (after the optimizer step, before
the next batch is drawn).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launcher.config import TrainConfig
from launcher.job import CONFIG_FILE, FINAL_DIR, PLAN_FILE
from launcher.plan import Plan
from launcher.train.data import PackedBlocks, StepSampler, build_corpus, find_corpus, rank_micro_batches
from launcher.train.engines import build_engine, model_construction
from launcher.train.metrics import MetricsWriter, Throughput, memory_stats
from launcher.train.modeling import build_model, compile_layers, model_architecture, parameter_elements, pretrained_dir
from launcher.train.optim import build_scheduler
from launcher.train.adapters import apply_finetune_method, quantization_config
from launcher.train.sft import ROW_FIELDS as SFT_ROW_FIELDS, SFTCorpus, length_grouped_sampler, trim_rows
from launcher.train.checkpoint import Checkpointer, resolve_resume
from launcher.train.fingerprint import Fingerprint, array_digest, files_digest
from launcher.train.preemption import REQUEUE_EXIT_CODE, PreemptionHandler


@dataclass
class TrainState:
    """Loop position, saved with every checkpoint: the sampler resumes from (epoch, position)."""

    global_step: int = 0
    epoch: int = 0
    position: int = 0  # samples of the epoch's permutation already consumed (all ranks together)
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    patience_counter: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def init_distributed() -> tuple[torch.device, int, int]:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); a bare `python -m` run is a world of one."""
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return device, dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    # `llaunch submit` sets LLAUNCH_DIST_TIMEOUT_S so that a collective waiting on a lost node fails the job
    # in minutes (torch's default is 10 min for NCCL, 30 for gloo).
    timeout = os.environ.get("LLAUNCH_DIST_TIMEOUT_S")
    group_kwargs = {"timeout": datetime.timedelta(seconds=float(timeout))} if timeout else {}
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **group_kwargs)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **group_kwargs)
    return device, dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    def __init__(self, job_dir: Path):
        self.job_dir = Path(job_dir)
        self.plan = Plan.load(self.job_dir / PLAN_FILE)
        self.config = TrainConfig.load(self.job_dir / CONFIG_FILE)
        self.device, self.rank, self.world_size = init_distributed()
        training = self.config.training
        if self.device.type == "cuda" and training.tf32 is not False:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        if self.config.data.dataset_format == "text":
            self.corpus = self._corpus()
            self.blocks = PackedBlocks(self.corpus.tokens(), self.plan.seq_len,
                                       self.config.data.validation_split_percentage)
        else:  # supervised fine-tuning JSONL: rows with the prompt masked (launcher/train/sft.py)
            self.corpus = self.blocks = SFTCorpus.from_config(self.config.data, pretrained_dir(self.config.model),
                                                              self.plan.seq_len, training.seed)
        self.tokenizer = self.corpus.tokenizer()
        self.blocks.check(self.plan.global_batch)
        data_seed = training.data_seed if training.data_seed is not None else training.seed
        self.sampler = StepSampler(self.blocks.num_train, self.plan.global_batch, data_seed)
        if training.group_by_length and isinstance(self.blocks, SFTCorpus):
            self.sampler = length_grouped_sampler(self.blocks, self.plan.global_batch, data_seed)
        self.total_steps = (training.max_steps if training.max_steps > 0
                            else max(1, math.ceil(training.num_train_epochs * self.sampler.steps_per_epoch)))

        quantization = quantization_config(self.config.finetune) if self.config.finetune.method == "qlora" else None
        hidden_size = model_architecture(self.config.model, self.tokenizer).hidden_size
        with model_construction(self.plan, training, self.config.parallel.deepspeed, self.rank, hidden_size,
                                quantized=quantization is not None) as empty:
            model = build_model(self.config.model, self.plan, self.tokenizer, training.seed, quantization, empty=empty)
            model = apply_finetune_method(model, self.config.finetune)  # before the engine wraps it
        if training.torch_compile:
            compile_layers(model)
        _, self.num_params = parameter_elements(model)
        self.flops_per_token = _flops_per_token(model.config, self.num_params, self.plan.seq_len)
        self.engine = build_engine(model, self.plan, training, self.device, self.config.parallel.deepspeed)
        self.scheduler = build_scheduler(self.engine.optimizer, training, self.total_steps)
        self.state = TrainState()
        self.should_stop = False
        self.metrics = None
        self.throughput: Throughput | None = None
        self.preempted = False
        self.last_eval: tuple[int, dict] | None = None  # (step, result) for the checkpoint's best-model metric
        self.fingerprint = self._fingerprint(model.config)
        self.checkpointer = Checkpointer(
            self.job_dir, strategy=self.plan.strategy, save_total_limit=training.save_total_limit,
            metric_for_best_model=training.metric_for_best_model, greater_is_better=training.greater_is_better,
            async_save=training.async_save,
        )
        self.preemption = PreemptionHandler(training.preemption_signals).install()

    # ----- data -----------------------------------------------------------------------------------------
    def _corpus(self):
        """Usually cached by `llaunch run` already; otherwise rank 0 tokenizes while the others wait."""
        model_dir = pretrained_dir(self.config.model)
        if self.rank == 0:
            corpus = build_corpus(self.config.data, model_dir)
        dist.barrier()
        if self.rank != 0:
            corpus = find_corpus(self.config.data, model_dir)
        return corpus

    def _batch(self, block_indices: np.ndarray, blocks_of) -> dict:
        rows = np.stack([blocks_of(int(i)) for i in block_indices])
        rows = torch.from_numpy(trim_rows(rows) if rows.ndim == 3 else rows)
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        if rows.dim() == 3:  # SFT rows: input_ids, labels, position_ids (restarting per packed example)
            return dict(zip(SFT_ROW_FIELDS, rows.unbind(1)))
        return {"input_ids": rows, "labels": rows}

    def _num_items(self, indices, split: str = "train") -> int:
        """Tokens the loss averages over: every next token of a text block, only answer tokens of an SFT row."""
        if isinstance(self.blocks, SFTCorpus):
            return sum(self.blocks.label_count(int(i), split) for i in indices)
        return len(indices) * (self.plan.seq_len - 1)

    # ----- the loop -----------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to total_steps (or early stop); returns the process exit code (REQUEUE_EXIT_CODE if preempted)."""
        self.restore()
        if self.rank == 0:
            self.metrics = MetricsWriter(self.job_dir, self.total_steps, self.state.global_step,
                                         self.config.training.report_to)
            print(f"training {self.num_params / 1e6:.1f}M parameters for {self.total_steps} steps "
                  f"({self.plan.strategy}, {self.world_size} x {self.device.type}, {self.plan.precision}, "
                  f"global batch {self.plan.global_batch} x {self.plan.seq_len} tokens)", flush=True)
        self.throughput = throughput = Throughput(self.flops_per_token, _peak_flops(self.plan, self.device,
                                                                                  self.world_size))
        loss_sum = torch.zeros((), device=self.device)
        window_steps = 0
        self.engine.train()
        try:
            while self.state.global_step < self.total_steps and not self.should_stop:
                lr = self.scheduler.get_last_lr()[0]
                loss_sum += self.train_step()
                window_steps += 1
                throughput.add(self.plan.global_batch_tokens)
                if self._log_due():
                    self._log_train(loss_sum, window_steps, lr, throughput)
                    loss_sum.zero_()
                    window_steps = 0
                self.on_step_end()
            self.checkpointer.wait()
            if self.preempted:
                return REQUEUE_EXIT_CODE
            if self.blocks.num_eval:
                self.evaluate_and_track()
            self.save_final()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return 0

    def train_step(self) -> torch.Tensor:
        """One optimizer update; returns this rank's mean token loss (a device tensor, not synced)."""
        indices, epoch, position = self.sampler.next_step(self.state.epoch, self.state.position)
        micro = rank_micro_batches(indices, self.rank, self.world_size, self.plan.micro_batch)
        num_items = self._num_items(np.concatenate(micro))
        step_loss = torch.zeros((), device=self.device)
        for i, block_indices in enumerate(micro):
            batch = self._batch(block_indices, self.blocks.train_block)
            with self.engine.accumulating(final=i == len(micro) - 1):
                loss = self.engine.forward({**batch, "num_items_in_batch": num_items})
                self.engine.backward(loss)
            step_loss += loss.detach().float()
        self.last_grad_norm = self.engine.step(self.config.training.max_grad_norm, self.config.training.max_grad_value)
        self.scheduler.step()
        self.state.global_step += 1
        self.state.epoch, self.state.position = epoch, position
        self.state.tokens_seen += self.plan.global_batch_tokens
        return step_loss

    def on_step_end(self) -> None:
        """The step boundary: periodic evaluation (and, with checkpoint.py, periodic save / preemption)."""
        eval_steps = self.config.training.eval_steps
        if eval_steps and self._due(eval_steps) and self.state.global_step != self.total_steps:
            self.evaluate_and_track()
        self.checkpoint_or_stop()

    def _log_due(self) -> bool:
        step, training = self.state.global_step, self.config.training
        return self._due(training.logging_steps) or step == self.total_steps or (step == 1 and training.logging_first_step)

    def _due(self, every: int) -> bool:
        return self.state.global_step % every == 0

    # ----- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean token loss and perplexity over the held-out blocks, every rank taking an equal share."""
        n = self.blocks.num_eval
        if self.config.data.max_eval_samples is not None:
            n = min(n, self.config.data.max_eval_samples)
        indices = np.arange(n)
        share = indices[self.rank::self.world_size][: n // self.world_size] if n >= self.world_size else indices
        batch_size = self.config.training.per_device_eval_batch_size or self.plan.micro_batch
        self.engine.train(False)
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for start in range(0, len(share), batch_size):
            chunk = share[start:start + batch_size]
            loss = self.engine.forward(self._batch(chunk, self.blocks.eval_block))
            tokens = self._num_items(chunk, split="eval")
            totals += torch.stack([loss.detach().double() * tokens, torch.tensor(tokens, device=self.device,
                                                                                   dtype=torch.float64)])
        self.engine.train(True)
        dist.all_reduce(totals)
        eval_loss = (totals[0] / totals[1]).item()
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}

    def evaluate_and_track(self) -> dict:
        """Evaluate, log, and update the best metric / early-stopping patience in TrainState."""
        result = self.evaluate()
        self.last_eval = (self.state.global_step, result)
        training = self.config.training
        key = training.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        value = result.get(key, result["eval_loss"])
        best = self.state.best_metric
        sign = 1.0 if training.greater_is_better else -1.0
        if best is None or sign * (value - best) > training.early_stopping_threshold:
            self.state.best_metric, self.state.best_step, self.state.patience_counter = value, self.state.global_step, 0
        else:
            self.state.patience_counter += 1
            if training.early_stopping_patience and self.state.patience_counter >= training.early_stopping_patience:
                self.should_stop = True
        if self.metrics is not None:
            self.metrics.log({"step": self.state.global_step, **result})
        if self.throughput is not None:
            self.throughput.restart()  # evaluation time is not training throughput
        return result

    # ----- checkpoints and preemption -------------------------------------------------------------------
    def _fingerprint(self, model_config) -> Fingerprint:
        training = self.config.training
        data = array_digest(self.corpus.tokens(), seq_len=self.plan.seq_len,
                            split=self.config.data.validation_split_percentage,
                            seed=training.data_seed if training.data_seed is not None else training.seed)
        schedule = {"total_steps": self.total_steps, "learning_rate": training.learning_rate,
                    "lr_scheduler_type": training.lr_scheduler_type, "warmup_steps": training.warmup_steps,
                    "warmup_ratio": training.warmup_ratio}
        return Fingerprint.build(model_config=model_config.to_dict(), tokenizer=files_digest(self.corpus.tokenizer_dir),
                                 data=data, global_batch=self.plan.global_batch, schedule=schedule)

    def restore(self) -> None:
        """Resume from --resume-from, else the newest complete checkpoint in the job dir (unless --no-resume)."""
        training = self.config.training
        path = resolve_resume(self.job_dir, training.resume_from_checkpoint, training.ignore_checkpoints,
                              training.overwrite_output_dir)
        if path is None:
            return
        saved = self.checkpointer.load(path, self.engine, self.fingerprint)
        self.state = TrainState.from_dict(saved["train_state"])
        self.scheduler.load_state_dict(saved["scheduler"])
        scaler = getattr(self.engine, "scaler", None)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.state.global_step}", flush=True)

    def checkpoint_or_stop(self) -> None:
        """Save per save_strategy (steps / epoch / no); when any rank was signalled, all save now and stop."""
        training = self.config.training
        self.preempted = self.preemption.should_stop()
        due = {"steps": lambda: self._due(training.save_steps), "no": lambda: False,
               "epoch": lambda: self._due(self.sampler.steps_per_epoch)}[training.save_strategy]
        if self.preempted or due():
            self.save_checkpoint()
        if self.preempted:
            self.should_stop = True
            if self.rank == 0:
                print(f"preempted ({self.preemption.received.name if self.preemption.received else 'another rank'}"
                      f"): saved step {self.state.global_step}, exiting with {REQUEUE_EXIT_CODE} to be requeued",
                      flush=True)

    def save_checkpoint(self) -> None:
        scaler = getattr(self.engine, "scaler", None)
        state = {"train_state": self.state.to_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None}
        step = self.state.global_step
        metrics = self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None
        documents = {PLAN_FILE: self.plan.to_yaml(), CONFIG_FILE: (self.job_dir / CONFIG_FILE).read_text(),
                     "model_config.json": self.engine.module.config.to_json_string(use_diff=False)}
        adapters = getattr(self.engine.module, "peft_config", None)
        if adapters:  # a LoRA run: export needs the adapter's config to rebuild (and merge) it
            documents["adapter_config.json"] = json.dumps(adapters["default"].to_dict(),
                                                          default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        self.checkpointer.save(step, self.engine, state, fingerprint=self.fingerprint, metrics=metrics,
                               documents=documents, tokenizer_dir=self.corpus.tokenizer_dir)

    # ----- logging and output -------------------------------------------------------------------------
    def _log_train(self, loss_sum: torch.Tensor, window_steps: int, lr: float, throughput: Throughput) -> None:
        loss = loss_sum / window_steps
        dist.all_reduce(loss)
        grad_norm = self.last_grad_norm
        record = {
            "step": self.state.global_step,
            "epoch": self.state.epoch + self.state.position / max(1, self.blocks.num_train),
            "loss": loss.item() / self.world_size,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_seen": self.state.tokens_seen,
            **throughput.report(),
            **memory_stats(self.device),
        }
        if self.metrics is not None:
            self.metrics.log(record)

    def save_final(self) -> None:
        """DIR/final: safetensors weights + config + tokenizer, loadable with AutoModelForCausalLM."""
        state = self.engine.full_state_dict()
        if self.rank == 0:
            final = self.job_dir / FINAL_DIR
            tmp = self.job_dir / (FINAL_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.config.use_cache = True
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            print(f"saved {final}", flush=True)
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _flops_per_token(hf_config, num_params: int, seq_len: int) -> float:
    """6 x (params without the input embedding) + causal attention 6 * layers * seq * hidden (PaLM app. B)."""
    embedding = hf_config.vocab_size * hf_config.hidden_size
    matmul = num_params - embedding if not getattr(hf_config, "tie_word_embeddings", False) else num_params
    return 6.0 * matmul + 6.0 * hf_config.num_hidden_layers * seq_len * hf_config.hidden_size


def _peak_flops(plan: Plan, device: torch.device, world_size: int) -> float | None:
    """Dense peak of all GPUs together in the compute precision, from launcher/data/gpus.json; None on CPU."""
    if device.type != "cuda":
        return None
    from launcher.hardware import gpu_facts

    facts = gpu_facts(plan.gpu_name or torch.cuda.get_device_name(device))
    if facts is None:
        return None
    key = {"amp-bf16": "bf16", "bf16": "bf16", "amp-fp16": "fp16"}.get(plan.precision, "tf32")
    return facts.peak_flops[key] * world_size
