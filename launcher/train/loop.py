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
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launcher.observe import event_ledger
from launcher.runtime.beacon import Phase
from launcher.config import TrainConfig
from launcher.jobdir.layout import JobDir
from launcher.planning.models import spec_from_config
from launcher.planning.plan import Plan
from launcher import env
from launcher.jobdir.run_lock import RunLock
from launcher.runtime.signals import StopSignals
from launcher.errors import REQUEUE_EXIT_CODE
from launcher.train.adapters import apply_finetune_method, as_planned, quantization_config
from launcher.train.cadence import SaveCadence
from launcher.train.checkpoint import Checkpointer, resolve_resume_on_every_rank
from launcher.train.chunked_loss import ROUTED_MODEL_TYPES
from launcher.train.data import StepSampler, rank_micro_batches
from launcher.train.device_mesh import RankMeshes
from launcher.train.distributed import init_distributed, on_every_rank
from launcher.train.engines import build_engine, model_construction
from launcher.train.final_model import write_final_model
from launcher.train.fingerprint import Fingerprint, array_digest, files_digest
from launcher.train.metrics import LossWindow, MetricsWriter, Throughput, memory_stats, peak_flops
from launcher.train.modeling import build_model, compile_layers, model_architecture, parameter_elements
from launcher.train.optim import build_scheduler
from launcher.train.preemption import PreemptionHandler
from launcher.train.progress import Progress
from launcher.train.training_data import load_training_data


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


class Trainer:
    def __init__(self, job_dir: Path, early_signals: StopSignals | None = None):
        """early_signals: the stop-signal recorder the rank installed before it imported torch; what it
        caught while the model was being built is acted on at the first step boundary."""
        self.job_dir = Path(job_dir)
        self.plan = Plan.load(JobDir(self.job_dir).plan)
        self.config = TrainConfig.load(JobDir(self.job_dir).config)
        self.device, self.rank, self.world_size = init_distributed(host_collectives=self.plan.offloads)
        if self.world_size != self.plan.world_size:  # a --min-nodes job on fewer nodes: same global batch
            self.plan = self.plan.on_nodes(self.world_size // self.plan.gpus_per_node)
        self.meshes = RankMeshes.build(self.plan.parallel, self.device.type)  # the tp ranks of a replica share data
        self.events = event_ledger.RankLedger(self.job_dir, self.rank)
        self.events.started()
        self.progress = Progress.start(self.rank, self.world_size)  # beacon, stack dumps, busy time, faults
        training = self.config.training
        if self.device.type == "cuda" and training.tf32 is not False:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self._load_data()
        model = self._build_model()
        _, self.num_params = parameter_elements(model)
        spec = spec_from_config(self.plan.model, model.config.to_dict())
        self.flops_per_token = spec.flops_per_token(self.plan.seq_len)  # the planner's rule, for MFU
        self.routed = model.config.model_type in ROUTED_MODEL_TYPES  # logs its router's aux loss
        self.engine = build_engine(model, self.plan, training, self.device, self.config.parallel.deepspeed,
                                   self.meshes)
        self.scheduler = build_scheduler(self.engine.optimizer, training, self.total_steps)
        self.events.append(event_ledger.MODEL_BUILT)
        self.state, self.loss_window = TrainState(), LossWindow(self.device)  # both go into each checkpoint
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
        if early_signals is not None:
            early_signals.hand_over(self.preemption)
        self.run_lock: RunLock | None = None
        self.cadence = SaveCadence(self.job_dir, training, self.rank, self.plan.nodes, self.events)

    def _load_data(self) -> None:
        """The training data, its tokenizer, the resumable step sampler and the run's length in steps."""
        training = self.config.training
        self.data = self._training_data()
        self.tokenizer = self.data.tokenizer()
        self.data.check(self.plan.global_batch)
        data_seed = training.data_seed if training.data_seed is not None else training.seed
        self.sampler = StepSampler(self.data.num_train, self.plan.global_batch, data_seed,
                                   self.data.epoch_order(self.plan.global_batch, data_seed, training.group_by_length))
        self.total_steps = (training.max_steps if training.max_steps > 0
                            else max(1, math.ceil(training.num_train_epochs * self.sampler.steps_per_epoch)))

    def _build_model(self):
        """The model as the plan says (empty on ranks that receive their shards, 4-bit for QLoRA), with its
        adapters, before the engine wraps it."""
        training, finetune = self.config.training, as_planned(self.config.finetune, self.plan)
        quantization = quantization_config(finetune) if finetune.method == "qlora" else None
        hidden_size = model_architecture(self.config.model, self.tokenizer).hidden_size
        with model_construction(self.plan, training, self.config.parallel.deepspeed, self.rank, hidden_size,
                                quantized=quantization is not None) as empty:
            model = build_model(self.config.model, self.plan, self.tokenizer, training.seed, quantization, empty=empty)
            model = apply_finetune_method(model, finetune)
        if training.torch_compile:
            compile_layers(model)
        return model

    # ----- data -----------------------------------------------------------------------------------------
    def _training_data(self):
        """Tokenized text is usually cached by `llaunch run` already; a rank that finds no cache waits while
        rank 0 builds it."""
        data = load_training_data(self.config, self.plan.seq_len, build=self.rank == 0)
        dist.barrier()
        return data or load_training_data(self.config, self.plan.seq_len, build=False)

    def _batch(self, split: str, indices: np.ndarray) -> dict:
        batch = {}
        for name, array in self.data.batch(split, indices).items():
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            if self.device.type == "cuda":
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            batch[name] = tensor
        return batch

    # ----- the loop -----------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to total_steps (or early stop); returns the process exit code (REQUEUE_EXIT_CODE if preempted)."""
        self.take_run_lock()
        self.restore()
        if self.rank == 0:
            self.metrics = MetricsWriter(self.job_dir, self.total_steps, self.state.global_step,
                                         self.config.training.report_to)
            print(f"training {self.num_params / 1e6:.1f}M parameters for {self.total_steps} steps "
                  f"({self.plan.strategy}, {self.world_size} x {self.device.type}, {self.plan.precision}, "
                  f"global batch {self.plan.global_batch} x {self.plan.seq_len} tokens)", flush=True)
        self.throughput = throughput = Throughput(self.flops_per_token, peak_flops(self.plan, self.device,
                                                                                  self.world_size))
        self.engine.train()
        try:
            while self.state.global_step < self.total_steps and not self.should_stop:
                lr = self.scheduler.get_last_lr()[0]
                self.loss_window.add(self.train_step())
                throughput.add(self.plan.global_batch_tokens)
                if self._log_due():
                    self._log_train(self.loss_window.take(), lr, throughput)
                self.events.step_end(self.state.global_step, self.state.tokens_seen, self._log_due())
                self.on_step_end()
            self.events.append(event_ledger.TRAIN_END, step=self.state.global_step,
                               cause="preempted" if self.preempted else "early stop" if self.should_stop else "finished")
            self.progress.enter(Phase.SAVE)
            self.checkpointer.wait()
            if self.preempted:
                return REQUEUE_EXIT_CODE
            if self.data.num_eval:
                self.evaluate_and_track()
            self.progress.enter(Phase.SAVE)
            self.save_final()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return 0

    def train_step(self) -> torch.Tensor:
        """One optimizer update; returns this rank's losses (metrics.step_losses: a device tensor, not synced)."""
        self.progress.step_begins(self.state.global_step + 1)
        indices, epoch, position = self.sampler.next_step(self.state.epoch, self.state.position)
        micro = rank_micro_batches(indices, self.meshes.data_rank, self.meshes.data_ranks, self.plan.micro_batch)
        num_items = self.data.label_count("train", np.concatenate(micro))
        batches = [self._batch("train", sample_indices) for sample_indices in micro]
        step_loss = self.engine.forward_backward(batches, num_items, self.progress)
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
        """Mean token loss and perplexity over the held-out blocks, every data rank taking an equal share (its tp
        ranks count it alike, which the ratio of the summed totals cancels)."""
        self.progress.enter(Phase.EVAL)
        n = self.data.num_eval
        if self.config.data.max_eval_samples is not None:
            n = min(n, self.config.data.max_eval_samples)
        indices = np.arange(n)
        rank, ranks = self.meshes.data_rank, self.meshes.data_ranks  # a pipeline's ranks evaluate the same share
        share = indices[rank::ranks][: n // ranks] if n >= ranks else indices
        batch_size = self.config.training.per_device_eval_batch_size or self.plan.micro_batch
        self.engine.train(False)
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for start in range(0, len(share), batch_size):
            chunk = share[start:start + batch_size]
            loss = self.engine.forward(self._batch("eval", chunk)).loss
            tokens = self.data.label_count("eval", chunk)
            totals += torch.stack([loss.detach().double() * tokens, torch.tensor(tokens, device=self.device,
                                                                                   dtype=torch.float64)])
        self.engine.train(True)
        dist.all_reduce(totals)
        eval_loss = (totals[0] / totals[1]).item()
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}

    def evaluate_and_track(self) -> dict:
        """Evaluate, log, and update the best metric / early-stopping patience in TrainState."""
        started = time.time()
        result = self.evaluate()
        self.events.append(event_ledger.EVAL, step=self.state.global_step, seconds=time.time() - started)
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
        data = array_digest(self.data.tokens(), seq_len=self.plan.seq_len,
                            split=self.config.data.validation_split_percentage,
                            seed=training.data_seed if training.data_seed is not None else training.seed)
        schedule = {"total_steps": self.total_steps, "learning_rate": training.learning_rate,
                    "lr_scheduler_type": training.lr_scheduler_type, "warmup_steps": training.warmup_steps,
                    "warmup_ratio": training.warmup_ratio}
        return Fingerprint.build(model_config=model_config.to_dict(), tokenizer=files_digest(self.data.tokenizer_dir),
                                 data=data, global_batch=self.plan.global_batch, schedule=schedule)

    def take_run_lock(self) -> None:
        """Rank 0 locks the job dir unless the `llaunch run` that started us holds it; then every other rank joins
        the lock, which is so held while any rank lives (launcher.jobdir.run_lock). Every rank learns a refusal."""
        acquire = self.rank == 0 and env.RUN_LOCK_HELD.get() != str(self.job_dir.resolve())
        self.run_lock = on_every_rank(lambda: RunLock.acquire(self.job_dir) if acquire else None, self.world_size)
        joined = on_every_rank(lambda: None if acquire else RunLock.join(self.job_dir, self.rank), self.world_size)
        self.run_lock = self.run_lock or joined

    def restore(self) -> None:
        """Resume from --resume-from, else the newest complete checkpoint in the job dir (unless --no-resume)."""
        training = self.config.training
        started = time.time()
        path = resolve_resume_on_every_rank(self.job_dir, training.resume_from_checkpoint,
                                            training.ignore_checkpoints, training.overwrite_output_dir)
        if path is None:
            return
        self.progress.enter(Phase.LOAD)
        saved = self.checkpointer.load(path, self.engine, self.fingerprint)
        self.state = TrainState.from_dict(saved["train_state"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("loss_window") is not None:  # None in a checkpoint of an older llaunch
            self.loss_window.load_state_dict(saved["loss_window"], self.world_size)
        scaler = getattr(self.engine, "scaler", None)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        self.events.append(event_ledger.RESTORE, step=self.state.global_step, seconds=time.time() - started)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.state.global_step}", flush=True)

    def checkpoint_or_stop(self) -> None:
        """Save per save_strategy (steps / epoch / no); when any rank was signalled, all save now and stop."""
        training = self.config.training
        self.preempted = self.preemption.should_stop()
        due = {"steps": lambda: self._due(training.save_steps), "no": lambda: False,
               "epoch": lambda: self._due(self.sampler.steps_per_epoch), "auto": lambda: False}[training.save_strategy]
        if self.cadence.active and not self.preempted:  # auto / save_interval_s: the cadence saves when all agree
            self.cadence.step_end(self.state.global_step, self.save_checkpoint, self.checkpointer.wait)
        elif self.preempted or due():
            self.save_checkpoint()
        if self.preempted:
            self.events.append(event_ledger.SIGNAL, step=self.state.global_step,
                               name=self.preemption.received.name if self.preemption.received else "another rank")
            self.should_stop = True
            if self.rank == 0:
                print(self.preemption.stop_sentence(self.state.global_step), flush=True)

    def save_checkpoint(self) -> None:
        self.progress.enter(Phase.SAVE)
        scaler = getattr(self.engine, "scaler", None)
        state = {"train_state": self.state.to_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "loss_window": self.loss_window.state_dict(self.world_size)}
        step = self.state.global_step
        metrics = self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None
        layout = JobDir(self.job_dir)
        documents = {layout.plan.name: self.plan.to_yaml(), layout.config.name: layout.config.read_text(),
                     "model_config.json": self.engine.module.config.to_json_string(use_diff=False)}
        adapters = getattr(self.engine.module, "peft_config", None)
        if adapters:  # a LoRA run: export needs the adapter's config to rebuild (and merge) it
            documents["adapter_config.json"] = json.dumps(adapters["default"].to_dict(),
                                                          default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        started = time.time()
        self.checkpointer.save(step, self.engine, state, fingerprint=self.fingerprint, metrics=metrics,
                               documents=documents, tokenizer=self.tokenizer)
        self.events.append(event_ledger.SAVE, step=step, seconds=time.time() - started)

    # ----- logging and output -------------------------------------------------------------------------
    def _log_train(self, losses: torch.Tensor, lr: float, throughput: Throughput) -> None:
        dist.all_reduce(losses)
        loss, aux_loss = (losses / self.world_size).tolist()
        grad_norm = self.last_grad_norm
        record = {
            "step": self.state.global_step,
            "epoch": self.state.epoch + self.state.position / max(1, self.data.num_train),
            "loss": loss,
            **({"aux_loss": aux_loss} if self.routed else {}),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_seen": self.state.tokens_seen,
            **throughput.report(),
            **memory_stats(self.device),
            **self.progress.straggler_report(),
        }
        if self.metrics is not None:
            self.metrics.log(record)

    def save_final(self) -> None:
        started = time.time()
        write_final_model(self.engine, self.tokenizer, JobDir(self.job_dir).final, self.rank)
        self.events.append(event_ledger.FINAL_SAVED, seconds=time.time() - started)

    def close(self) -> None:
        """Give back what the Trainer took: its signal handlers (lr-find runs it inside the CLI's process), the
        run lock, the process group."""
        self.preemption.uninstall()
        self.progress.close()
        if self.run_lock is not None:
            self.run_lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()

