"""Every command x every class of bad input: one `llaunch: error:` sentence, exit 2, nothing created or changed.

The classes: path arguments (missing, a file for a directory and the reverse, under a file, a run's own
directory, the same path twice, unwritable: /sys takes no new entries even as root; a FIFO or a directory where a file
belongs), numbers (zero, negative, nan, inf, huge; in flags, configs, cluster profiles and LLAUNCH_* variables), file
formats (empty, binary, truncated, not UTF-8) and checkpoints or models that are damaged. Each case runs the real CLI
in-process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from examples import arithmetic
from launcher.cli import main
from launcher.train.sft import format_prompt
from tests.tiny_run import tiny_run_config

REPO = Path(__file__).resolve().parents[2]

# (command line with W = the workspace, message fragment)
LONG_NAME, LONG_PATH = "n" * 300, "/".join(["p" * 200] * 21)  # over NAME_MAX (255), over PATH_MAX (4096)
RUN = "run W/tiny.yaml --output-dir W/out --dry-run"
SFT = "run W/sft.yaml --output-dir W/out --dry-run"
SWEEP = "submit W/tiny.yaml --cluster local --output-dir W/sweep --dry-run"
CASES = [
    # the commands of a cluster: submit, doctor, status / logs / cancel, the local cluster, probe
    ("submit W/missing.yaml --cluster local --dry-run", "does not exist"),
    ("submit W/tiny.yaml --cluster nosuch --dry-run", "cluster profile 'nosuch' not found"),
    ("submit W/tiny.yaml --cluster local --nodes 0 --dry-run", "--nodes must be a positive integer"),
    ("doctor W/missing.yaml", "does not exist"),
    ("doctor --nodes 0", "--nodes must be a positive integer"),
    ("doctor --cluster nosuch", "cluster profile 'nosuch' not found"),
    ("cancel 999999", "job 999999 was not submitted with llaunch from here"),
    ("cancel ../W/afile", "is not a SLURM job id"),
    ("status ../../etc/passwd", "is not a SLURM job id"),
    ("cluster --state-dir W/afile status", "is a file; pass --state-dir with a directory"),
    ("cluster --state-dir W/afile up", "is a file; pass --state-dir with a directory"),
    ("SLURM_JOB_ID=5 SLURM_JOB_NUM_NODES=abc probe", "the allocation's node count is 'abc'"),
    # run: the config file
    ("run W/missing.yaml --output-dir W/out", "does not exist"),
    ("run W --output-dir W/out", "cannot read config file"),
    ("run W/bin.dat --output-dir W/out", "not UTF-8"),
    ("run W/truncated.yaml --output-dir W/out", "not valid YAML"),
    ("run W/empty --output-dir W/out", "model.name_or_path is empty"),
    # run: the output directory
    ("run W/tiny.yaml --output-dir W/afile", "is a file"),
    ("run W/tiny.yaml --output-dir W/out --nproc-per-node 2 --pp 2 finetune.method=lora",
     "pipeline stages train full weights"),
    ("run W/tiny.yaml --output-dir W/out --nproc-per-node 4 --pp 4", "choose pp x virtual stages <= 2"),
    ("run W/tiny.yaml --output-dir W/afile/out", "under the file"),
    ("run W/tiny.yaml --output-dir W", "not a llaunch run directory"),
    ("run W/tiny.yaml --output-dir W --overwrite", "not a llaunch run directory"),
    ("run W/tiny.yaml --output-dir W/done", "already holds a finished run and no checkpoint to continue it from"),
    # --overwrite would remove the checkpoint it is to resume from: refused before anything is removed
    ("run W/tiny.yaml --output-dir W/done --overwrite --resume-from W/done/checkpoints/step-1",
     "which --overwrite would remove first"),
    # the run lock as a symbolic link: the link and its target stay as they are
    (f"{RUN.replace('W/out', 'W/linked')}", "is a symbolic link"),
    ("run W/tiny.yaml --output-dir /sys/llaunch-out", "cannot create"),  # sysfs: no new entries, even as root
    (f"{RUN} --resume-from W/afile", "not a complete llaunch checkpoint"),
    (f"{RUN} --resume-from W/nowhere", "not a complete llaunch checkpoint"),
    # run: every number
    (f"{RUN} training.learning_rate=.nan", "training.learning_rate must be a finite number"),
    (f"{RUN} training.learning_rate=-1", "training.learning_rate must be a finite number"),
    (f"{RUN} training.learning_rate=.inf", "training.learning_rate must be a finite number"),
    (f"{RUN} --max-steps 0", "training.max_steps must be at least 1"),
    (f"{RUN} --max-steps -5", "training.max_steps must be at least 1"),
    (f"{RUN} --save-steps 0", "training.save_steps must be at least 1"),
    (f"{RUN} --nproc-per-node 0", "parallel.nproc_per_node must be at least 1"),
    (f"{RUN} training.per_device_train_batch_size=0", "must be at least 1"),
    (f"{RUN} training.per_device_train_batch_size=1000000000000", "does not fit"),
    (f"{RUN} training.gradient_accumulation_steps=0", "must be at least 1"),
    (f"{RUN} training.global_batch_size=-2", "must be at least 1"),
    (f"{RUN} training.num_train_epochs=0", "training.num_train_epochs must be"),
    (f"{RUN} training.seed=-1", "training.seed must be in"),
    (f"{RUN} training.seed=99999999999999999999", "training.seed must be in"),
    (f"{RUN} training.warmup_ratio=2", "training.warmup_ratio must be"),
    (f"{RUN} training.warmup_steps=-3", "training.warmup_steps must be"),
    (f"{RUN} training.adam_beta1=1.5", "training.adam_beta1 must be"),
    (f"{RUN} training.adam_epsilon=0", "training.adam_epsilon must be"),
    (f"{RUN} training.max_grad_norm=.nan", "training.max_grad_norm must be"),
    (f"{RUN} training.eval_steps=0", "training.eval_steps must be at least 1"),
    (f"{RUN} training.loss_chunk_tokens=-1", "training.loss_chunk_tokens must be"),
    (f"{RUN} --strategy ddp parallel.offload=optimizer", "offload 'optimizer' is not something ddp can do"),
    (f"{RUN} parallel.strategy=zero4", "parallel.strategy 'zero4' is not one of ddp, fsdp"),
    # tensor parallelism: what its engine, its plan and the model cannot run, before any process starts
    (f"{RUN} --nproc-per-node 2 --tp 2 --strategy ddp", "which the ddp engine cannot run; use --strategy fsdp or hsdp"),
    (f"{RUN} --nproc-per-node 2 --tp 2 --strategy fsdp finetune.method=lora", "tensor parallelism splits full weights"),
    (f"{RUN} --nproc-per-node 4 --tp 4 --strategy fsdp", "tp 4 must divide the 4 attention heads and the 2 KV heads"),
    (f"{RUN} --nproc-per-node 2 --tp 2 --strategy fsdp model.name_or_path=gpt2 model.overrides={{}}",
     "tensor parallelism runs on llama, mistral, qwen2, qwen3 decoders, not gpt2"),
    (f"{RUN} parallel.offload=disk", "parallel.offload 'disk' is not one of none, optimizer"),
    (f"{RUN} model.attn_implementation=flash_attention_9", "model.attn_implementation 'flash_attention_9' is not one of"),
    (f"{RUN} training.save_total_limit=0", "training.save_total_limit must be at least 1"),
    (f"{RUN} data.block_size=1", "data.block_size must be at least 2"),
    (f"{RUN} training.gradient_accumulation_steps=1 training.global_batch_size=6", "accumulation x 1 rank(s)"),
    (f"{RUN} data.block_size=100000", "fewer than one global batch"),
    # a flag that replaced a config value is said only once the run starts: a refused run stays one sentence
    (f"{RUN} parallel.strategy=zero2 --strategy ddp data.block_size=100000", "fewer than one global batch"),
    (f"{RUN} data.vocab_size=0", "data.vocab_size must be at least 1"),
    (f"{RUN} data.max_train_bytes=0", "data.max_train_bytes must be at least 1"),
    (f"{RUN} data.validation_split_percentage=.nan", "validation_split_percentage"),
    (f"{RUN} finetune.lora_dropout=2", "finetune.lora_dropout must be"),
    (f"{RUN} finetune.r=0", "finetune.r"),
    # run: expert parallelism borrows FSDP's shard ranks, and splits only the experts the ranks know
    (f"{RUN} model.name_or_path=mixtral-8x7b --nproc-per-node 2 --ep 2 --strategy ddp", "use --strategy fsdp or hsdp"),
    (f"{RUN} model.name_or_path=gpt-oss-20b --nproc-per-node 2 --ep 2", "not gpt_oss's; train it with --ep 1"),
    (f"{RUN} model.name_or_path=mixtral-8x7b --nproc-per-node 4 --ep 2 --pp 2 --strategy fsdp",
     "the ranks run expert parallelism without pp so far; keep --ep 1 or --pp 1"),
    (f"{RUN} model.name_or_path=mixtral-8x7b --nproc-per-node 4 --ep 2 --tp 2 --etp 2 --strategy fsdp",
     "without tp so far and hold whole experts, not split over --etp 2; keep --ep 1 or --tp 1"),
    (f"{RUN} model.name_or_path=mixtral-8x7b --nproc-per-node 4 --ep 2 --tp 2 --etp 4 --strategy fsdp",
     "--etp 4 must be 1 (whole experts on each tp rank) or tp 2"),
    (f"{RUN} --etp 0", "parallel.etp must be a positive integer, not 0"),
    (f"{RUN} model.name_or_path=mixtral-8x7b --nproc-per-node 2 --ep 2 --method lora finetune.lora_dropout=0",
     "LoRA on the routed experts"),
    # run: PEFT's adapters on a mixture of experts' fused experts (ParamWrapper) take no dropout
    (f"{RUN} model.name_or_path=qwen3-30b-a3b --method lora", "set finetune.lora_dropout: 0"),
    # run: model overrides
    (f"{RUN} 'model.overrides={{hidden_size: 0}}'", "must be a positive integer"),
    (f"{RUN} 'model.overrides={{bogus_key: 3}}'", "is not a key of a llama config"),
    (f"{RUN} 'model.overrides={{model_type: bert}}'", "another kind of model"),
    (f"{RUN} 'model.overrides={{rms_norm_eps: .nan}}'", "must be a finite number"),
    (f"{RUN} 'model.overrides={{num_attention_heads: 5}}'", "not a multiple"),
    # run: the data
    (f"{RUN} data.train_files=W/bin.dat", "is binary, not text"),
    (f"{RUN} data.train_files=W/empty", "hold no text"),
    (f"{RUN} data.train_files=W/nowhere.txt", "does not exist"),
    (SFT, "not UTF-8 text"),
    (f"{SFT} data.on_bad_line=skip", "holds no usable SFT record"),
    (f"{SFT} data.train_files=W/bin.dat data.on_bad_line=skip", "holds no usable SFT record"),
    (f"{SFT} data.train_files=W/truncated.jsonl", "invalid JSON"),
    # plan
    ("plan --model tinyllama-1.1b -o W", "is a directory"),
    ("plan --model tinyllama-1.1b -o W/afile/plan.yaml", "lies under the file"),
    ("plan --model tinyllama-1.1b -o W/tiny.yaml", "exists and is not a plan"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 1 -o /sys/llaunch-plan.yaml", "cannot write"),
    ("plan --model tinyllama-1.1b --model-override bogus=3", "is not a key of a llama config"),
    ("plan --model tinyllama-1.1b --model-override hidden_size=0", "must be a positive integer"),
    ("plan --model tinyllama-1.1b --model-override hidden_size=nan", "must be a positive integer"),
    ("plan --model tinyllama-1.1b --model-override model_type=bert", "another kind of model"),
    ("plan --model mixtral-8x7b --model-override num_experts_per_tok=9", "must be between 1 and the 8 routed experts"),
    ("plan --model deepseek-v3 --model-override kv_lora_rank=0", "must be a positive integer"),
    ("plan --model tinyllama-1.1b --micro-batch 0", "--micro-batch must be a positive integer"),
    ("plan --model tinyllama-1.1b --seq-len -1", "--seq-len must be a positive integer"),
    ("plan --model tinyllama-1.1b --gpus 0", "--gpus-per-node must be a positive integer"),
    ("plan --model tinyllama-1.1b --nodes 0", "--nodes must be a positive integer"),
    ("plan --model tinyllama-1.1b --gpu-mem nanGiB", "is not a size"),
    ("plan --model tinyllama-1.1b --lora-r 0", "--lora-r must be a positive integer"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --tp 3", "does not divide the 8 GPUs"),
    ("plan --model gpt2 --device cpu --gpus 2 --cp 2", "--cp needs torch's ring attention, which in torch 2.13 dispatches "
     "only CUDA's flash, memory-efficient and cuDNN SDPA kernels"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --tp 2 --pp 1 --global-batch 6", "x 4 data-parallel rank(s)"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --cp 2 --activation-checkpointing selective --trace",
     "--trace of cp recomputes none or all of a layer"),
    ("plan --model qwen3-30b-a3b --model-override num_hidden_layers=2 --gpu H100 --gpus 8 --strategy zero2 --ep 8 "
     "--trace", "--trace traces ep as the FSDP engine runs it, and zero2 does not"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --tp 0", "--tp must be a positive integer"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --pp-microbatches 0", "must be a positive integer"),
    ("plan --model tinyllama-1.1b --global-batch 0", "--global-batch"),
    ("plan --model W/bin.dat", "is not valid JSON"),
    ("plan --model W/empty", "is not valid JSON"),
    ("plan --model W/nowhere", "unknown model"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 2 --strategy ddp --offload optimizer", "not something ddp can do"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 2 --optimizer-in-backward --offload optimizer",
     "nothing is offloaded; drop --offload"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 2 --optimizer-in-backward", "use 1 GPU, --strategy ddp"),
    # datasplit
    ("datasplit W/bin.dat --train-output W/a --eval-output W/b", "not UTF-8"),
    ("datasplit W/nul.jsonl --train-output W/a --eval-output W/b", "binary"),
    ("datasplit W --train-output W/a --eval-output W/b", "does not exist"),
    ("datasplit W/nowhere --train-output W/a --eval-output W/b", "does not exist"),
    ("datasplit W/empty --train-output W/a --eval-output W/b", "cannot give both"),
    ("datasplit W/data.jsonl --train-output W --eval-output W/b", "is a directory"),
    ("datasplit W/data.jsonl --train-output W/afile/a --eval-output W/b", "lies under the file"),
    ("datasplit W/data.jsonl --train-output W/data.jsonl --eval-output W/b", "is the input file"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output W/a", "both"),
    ("datasplit W/data.jsonl --train-output /sys/llaunch-a --eval-output W/b", "cannot write"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output /sys/llaunch-b", "cannot write"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output W/b --eval-percentage nan", "--eval-percentage"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output W/b --eval-percentage 0", "--eval-percentage"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output W/b --eval-percentage 100", "--eval-percentage"),
    ("datasplit W/data.jsonl --train-output W/a --eval-output W/b --eval-percentage -5", "--eval-percentage"),
    # checkpoints
    ("checkpoints W/afile", "does not exist"),
    ("checkpoints W/nowhere", "does not exist"),
    # export
    ("export W/afile --to W/x", "not a complete llaunch checkpoint"),
    ("export W/nowhere --to W/x", "not a complete llaunch checkpoint"),
    ("export W --to W/x", "not a complete llaunch checkpoint"),
    ("export W/done/checkpoints/step-1 --to W/x", "not a complete llaunch checkpoint"),
    ("export W/done/checkpoints/step-1 --to W/afile", "already exists"),
    ("export W/done/checkpoints/step-1 --to W", "already exists"),
    ("export W/done/checkpoints/step-1 --to W/afile/x", "lies under the file"),
    ("export W/adapter --to W/x --merge", "its base model is not a local directory"),  # a random-init base
    ("export W/adapter --to W/x", "its base model is not a local directory"),
    ("export W/adapter-of-model --to W/x", "add --merge to fold it into its base"),
    # generate
    ("generate --model W/nowhere --prompt hi", "not a model directory"),
    ("generate --model W/afile --prompt hi", "not a model directory"),
    ("generate --model W --prompt hi", "not a model directory"),
    ("generate --model W/damaged-model --prompt hi", "cannot load the model"),
    ("generate --model W/model --prompt hi --max-new-tokens -1", "--max-new-tokens must be at least 1"),
    ("generate --model W/model --prompt hi --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    ("generate --model W/model --prompt hi --temperature nan", "--temperature"),
    ("generate --model W/model --prompt hi --temperature -1", "--temperature"),
    ("generate --model W/model --prompt hi --top-k -1", "--top-k"),
    ("generate --model W/model --prompt ' '", "--prompt is empty"),
    # lr-find
    ("lr-find W/tiny.yaml --output-dir W/afile", "is a file"),
    ("lr-find W/tiny.yaml --output-dir W/done", "training run's directory"),
    ("lr-find W/tiny.yaml --output-dir W/lr --num-steps 0", "at least 10 steps"),
    ("lr-find W/tiny.yaml --output-dir /sys/llaunch-lr --num-steps 10", "cannot create"),
    ("lr-find W/tiny.yaml --output-dir W/lr --start-lr nan", "0 < start_lr < end_lr"),
    ("lr-find W/tiny.yaml --output-dir W/lr --end-lr inf", "0 < start_lr < end_lr"),
    ("lr-find W/tiny.yaml --output-dir W/lr --start-lr -1", "0 < start_lr < end_lr"),
    ("lr-find W/tiny.yaml --output-dir W/lr --smoothing 1", "--smoothing"),
    ("lr-find W/tiny.yaml --output-dir W/lr --smoothing nan", "--smoothing"),
    ("lr-find W/missing.yaml --output-dir W/lr", "does not exist"),
    # status / logs of a job that was never submitted
    ("status 424242", "has no record"),
    ("logs 424242", "has no record"),
    ("logs nope", "is not a SLURM job id"),
    # checkpoint cadence and goodput
    (f"{RUN} training.save_strategy=sometimes", "is not one of steps, epoch, no, auto"),
    (f"{RUN} training.save_interval_s=0", "training.save_interval_s must be a positive number of seconds"),
    (f"{RUN} training.save_interval_s=.nan", "training.save_interval_s must be a positive number of seconds"),
    (f"{RUN} training.save_strategy=epoch training.save_interval_s=60", "remove one of them"),
    (f"{RUN} training.save_overhead_cap=0", "training.save_overhead_cap must be a finite number in (0, 1)"),
    (f"{RUN} supervision.dist_timeout_s=0", "supervision.dist_timeout_s must be from 1 to 10,000,000 seconds"),
    (f"{RUN} 'supervision.watchdog={{floor_s: -30}}'", "supervision.watchdog.floor_s must be a positive number"),
    (f"{RUN} 'supervision.watchdog={{window: 2.5}}'", "supervision.watchdog.window must be a positive integer"),
    (f"{RUN} 'supervision.watchdog={{floor: 3}}'", "supervision.watchdog has unknown key 'floor'"),
    (f"{RUN} 'supervision.watchdog={{enabled: 0}}'", "supervision.watchdog.enabled must be true or false"),
    ("goodput nope", "is not a SLURM job id"),
    ("goodput W/afile", "is not a directory"),
    ("goodput W", "has no event ledger"),
    ("goodput W --plot W/afile/t.png", "lies under the file"),
    ("goodput W/fifo-ledger", "events.jsonl is not a regular file"),  # a FIFO would block the reader forever
    ("goodput W/dir-ledger", "events.jsonl is not a regular file"),
    ("goodput W/loop-ledger", "cannot read"),  # unreadable (as root too): a symlink to itself
    # environment variables (NAME=value before the command)
    (f"LLAUNCH_WATCHDOG=poll_s=0 {RUN}", "LLAUNCH_WATCHDOG entry 'poll_s=0' must be a positive number"),
    (f"LLAUNCH_WATCHDOG=floor_s=-30 {RUN}", "LLAUNCH_WATCHDOG entry 'floor_s=-30' must be a positive number"),
    (f"LLAUNCH_WATCHDOG=first_step_s=nan {RUN}", "LLAUNCH_WATCHDOG entry 'first_step_s=nan' must be a positive"),
    (f"LLAUNCH_WATCHDOG=k=inf {RUN}", "LLAUNCH_WATCHDOG entry 'k=inf' must be a positive number"),
    (f"LLAUNCH_WATCHDOG=window=-1 {RUN}", "LLAUNCH_WATCHDOG entry 'window=-1' must be a positive number"),
    (f"LLAUNCH_WATCHDOG=grace_s=1e400 {RUN}", "LLAUNCH_WATCHDOG entry 'grace_s=1e400' must be a positive number"),
    (f"LLAUNCH_FAULT=slow:rank=0,ms=-100 {RUN}", "LLAUNCH_FAULT fault 'slow:rank=0,ms=-100' is not one of"),
    (f"LLAUNCH_FAULT=slow:rank=0,ms=nan {RUN}", "LLAUNCH_FAULT fault 'slow:rank=0,ms=nan' is not one of"),
    (f"LLAUNCH_FAULT=slow:rank=0,ms=inf {RUN}", "LLAUNCH_FAULT fault 'slow:rank=0,ms=inf' is not one of"),
    (f"LLAUNCH_FAULT=crash:rank=0,step=0 {RUN}", "LLAUNCH_FAULT fault 'crash:rank=0,step=0' is not one of"),
    ("LLAUNCH_FAULT=slow:rank=0,ms=nan submit W/tiny.yaml --cluster local --output-dir W/out --dry-run",
     "LLAUNCH_FAULT fault 'slow:rank=0,ms=nan' is not one of"),
    # cluster profiles
    ("plan --model tinyllama-1.1b --cluster W/dir.yaml", "cannot read cluster profile"),
    ("plan --model tinyllama-1.1b --cluster W/fifo.yaml", "is not a regular file"),  # would block the reader
    ("plan --model tinyllama-1.1b --cluster W/loop.yaml", "cannot read cluster profile"),
    ("plan --model tinyllama-1.1b --cluster W/latin1-profile.yaml", "is not UTF-8 text"),
    ("plan --model tinyllama-1.1b --cluster W/list-profile.yaml", "must be a mapping of keys to values"),
    ("plan --model tinyllama-1.1b --cluster W/time-profile.yaml", "time must be [D-]HH:MM:SS with minutes and"),
    ("plan --model tinyllama-1.1b --cluster W/timeout-profile.yaml", "dist_timeout_s must be a positive integer"),
    ("plan --model tinyllama-1.1b --cluster W/watchdog-profile.yaml", "'local': watchdog.poll_s must be a positive"),
    ("plan --model tinyllama-1.1b --cluster W/nic-profile.yaml", "nics_per_node must be given with nic_gbit_per_s"),
    ("plan --model tinyllama-1.1b --cluster W/nvlink-profile.yaml", "nvlink_gb_per_s must be NVLink GB/s per GPU"),
    # fp8 needs fp8 tensor cores on a GPU (torch._scaled_mm runs on CPU too); the ranks convert full models under DDP / FSDP2
    ("plan --model tinyllama-1.1b --gpu A100 --gpus 8 --precision fp8", "needs fp8 tensor cores"),
    ("plan --model tinyllama-1.1b --gpu H100 --gpus 8 --precision fp8 --offload optimizer",
     "fp8 runs under ddp / fsdp / hsdp, none of which offloads optimizer alone"),
    (f"{RUN} --nproc-per-node 2 --precision fp8 --strategy zero2", "fp8 (torchao float8) trains full weights under "
     "--strategy ddp / fsdp / hsdp without tp, pp or ep"),
    (f"{RUN} --nproc-per-node 4 --tp 2 --strategy fsdp --precision fp8", "fp8 (torchao float8) trains full weights"),
    (f"{RUN} --precision fp8 finetune.method=lora", "fp8 (torchao float8) trains full weights"),
    (f"{RUN} --nproc-per-node 2 --cp 2", "--cp needs torch's ring attention"),
    # a profile's container: a source each node would resolve on its own, a runtime llaunch cannot render, a
    # line break that would start a line of shell in the sbatch script
    ("submit W/tiny.yaml --cluster W/mount-profile.yaml --output-dir W/out --dry-run",
     "'local': container.mounts must be a list of SRC:DST or SRC:DST:ro with absolute paths"),
    ("submit W/tiny.yaml --cluster W/runtime-profile.yaml --output-dir W/out --dry-run",
     "'local': container.runtime must be pyxis or apptainer, not 'docker'"),
    ("submit W/tiny.yaml --cluster W/image-profile.yaml --output-dir W/out --dry-run",
     "'local': container.image must be a non-empty value on one line"),
    # frozen code and the notify hook: no code to freeze, uncommitted changes, a hook that is no command
    ("submit W/repo/tiny.yaml --cluster local --output-dir W/out --dry-run",
     "repo has uncommitted changes (1 file(s): notes.md); commit them, or pass --allow-dirty"),
    ("submit W/tiny.yaml --cluster local --output-dir W/out --dry-run --code W/repo", "repo has uncommitted changes"),
    ("submit W/tiny.yaml --cluster local --output-dir W/out --dry-run --code W/missing",
     "is not a directory; pass the directory of the code the job imports"),
    ("submit W/tiny.yaml --cluster local --output-dir W/out --dry-run --code W/afile", "is not a directory"),
    ("submit W/tiny.yaml --cluster local --output-dir W/out --dry-run --notify ''",
     "--notify must be a shell command on one line"),
    ("submit W/tiny.yaml --cluster W/notify-profile.yaml --output-dir W/out --dry-run",
     "'local': notify must be a shell command on one line"),
    # spare nodes: a negative count, spares without restarts to use them, with a job that may shrink, too many
    # for the partition is tests/slurm's; a sweep's elements have none; `cluster` sizes only with `up`
    ("submit W/tiny.yaml --cluster local --spare-nodes -1 --dry-run", "--spare-nodes must be a non-negative integer"),
    ("submit W/tiny.yaml --cluster local --spare-nodes 1 --dry-run",
     "max_restarts must be at least 1 with 1 spare node(s) (each restart puts a spare in a failed node's place), "
     "e.g. --max-restarts 1"),
    ("submit W/tiny.yaml --cluster local --nodes 2 --min-nodes 1 --spare-nodes 1 --max-restarts 1 --dry-run",
     "--spare-nodes must be 0 when min_nodes lets the job shrink"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,3e-4 --spare-nodes 1 --max-restarts 1",
     "a sweep's elements run without spare nodes"),
    ("cluster status --nodes 3", "--nodes 3 sizes the cluster `llaunch cluster up` starts"),
    ("cluster up --nodes 0", "--nodes 0 sizes the cluster `llaunch cluster up` starts; give a positive number"),
    # sweeps: a key the config lacks, an empty value, a value its key's rule refuses (in any element), an element
    # the planner cannot fit, elements that collide (one value twice, one job dir), what the sweep owns, a key
    # also set elsewhere, a grid of one, --max-parallel alone or below 1, a directory that is no sweep's
    (f"{SWEEP} --sweep training.lerning_rate=1e-4,3e-4", "did you mean training.learning_rate?"),
    (f"{SWEEP} --sweep nosuch=1,2", "--sweep key 'nosuch' is not a key of the train config"),
    (f"{SWEEP} --sweep training.learning_rate", "must look like section.key=V1,V2"),
    (f"{SWEEP} --sweep training.learning_rate=", "has an empty value"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,,3e-4", "has an empty value"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,-1",
     "sweep element learning_rate=-1 (training.learning_rate=-1): training.learning_rate must be a finite number"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,.nan", "training.learning_rate must be a finite number"),
    (f"{SWEEP} --sweep training.per_device_train_batch_size=2,1000000000000", "per_device_train_batch_size=1000000"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,0.0001", "are the same config; give each value once"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4,1e-4", "lists 1e-4 twice"),
    (f"{SWEEP} --sweep model.name_or_path=a/b,a-b", "would share the job dir name_or_path=a-b; give values that differ in letters or digits"),
    (f"{SWEEP} --sweep training.output_dir=W/a,W/b", "--sweep cannot vary training.output_dir"),
    (f"{SWEEP} --sweep training.max_steps=3,4 --max-steps 5", "--max-steps 5 sets training.max_steps"),
    (f"{SWEEP.replace('tiny.yaml', 'tiny.yaml training.seed=1')} --sweep training.seed=2,3",
     "the override training.seed=1 sets a key --sweep varies"),
    (f"{SWEEP} --sweep training.seed=1,2 --sweep training.seed=3", "--sweep training.seed is given twice"),
    (f"{SWEEP} --sweep training.learning_rate=1e-4", "which is no sweep"),
    (f"{SWEEP} --max-parallel 2", "--max-parallel throttles a sweep's job array"),
    (f"{SWEEP} --sweep training.seed=1,2 --max-parallel 0", "--max-parallel must be a positive integer"),
    (f"{SWEEP.replace('W/sweep', 'W/done')} --sweep training.seed=1,2", "holds a single run, not a sweep"),
    (f"{SWEEP.replace('W/sweep', 'W')} --sweep training.seed=1,2", "is not a llaunch sweep directory"),
    (f"{SWEEP.replace('W/sweep', 'W/afile')} --sweep training.seed=1,2", "is a file"),
    (f"LLAUNCH_DIST_TIMEOUT_S=nan {RUN}", "LLAUNCH_DIST_TIMEOUT_S='nan' must be a number of seconds from 1 to 1e7"),
    # a cache that is a file or takes no new entries, a name over 255 bytes, a path over PATH_MAX, /proc
    (f"{RUN} data.cache_dir=W/afile", "cannot write the token cache in"),
    (f"{RUN} data.cache_dir=/sys/llaunch-cache", "cannot write the token cache in"),
    (f"run W/tiny.yaml --output-dir W/{LONG_NAME} --dry-run", "is too long"),
    (f"run W/tiny.yaml --output-dir W/{LONG_PATH} --dry-run", "is too long"),
    (f"run W/{LONG_NAME}.yaml --output-dir W/out --dry-run", "File name too long"),
    (f"run W/{LONG_PATH}.yaml --output-dir W/out --dry-run", "File name too long"),
    (f"export W/done/checkpoints/step-1 --to W/{LONG_NAME}", "is too long"),
    (f"export W/done/checkpoints/step-1 --to W/{LONG_PATH}", "is too long"),
    (f"plan --model tinyllama-1.1b --gpu H100 --plot W/{LONG_NAME}.png", "is too long"),
    (f"plan --model tinyllama-1.1b --gpu H100 --plot W/{LONG_PATH}.png", "is too long"),
    (f"goodput W/ledger --plot W/{LONG_NAME}.png", "is too long"),
    ("plan --model tinyllama-1.1b --gpu H100 --plot /proc/llaunch.png", "choose another path"),
    ("goodput W/ledger --plot /proc/llaunch.png", "choose another path"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs for every case; the token cache lives outside it, so the workspace itself must never change."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = root / "W"
    w.mkdir()
    tiny_run_config(w, cache_dir=root / "cache", training={"max_steps": 3})
    (w / "afile").write_text("a file, not a directory\n")
    (w / "bin.dat").write_bytes(bytes(range(256)) * 8)
    (w / "nul.jsonl").write_bytes(b'{"a": 1}\n\x00\x00\n{"b": 2}\n')
    (w / "empty").write_text("")
    (w / "truncated.yaml").write_text("model:\n  name_or_path: [tinyllama\n")
    records = arithmetic.make_records(60, seed=0, max_operand=9)
    arithmetic.write_jsonl(records, w / "data.jsonl")
    (w / "truncated.jsonl").write_bytes((w / "data.jsonl").read_bytes()[:-7])
    texts = [format_prompt(r["instruction"]) + r["output"] for r in records]
    arithmetic.make_base_model(w / "model", texts, hidden_size=32, layers=2)
    damaged = w / "damaged-model"
    damaged.mkdir()
    for file in (w / "model").iterdir():
        data = file.read_bytes()
        (damaged / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    (w / "latin1.jsonl").write_bytes('{"instruction": "caf\u00e9", "output": "1"}\n'.encode("latin-1") * 40)
    sft = {"model": {"name_or_path": str(w / "model")},
           "data": {"dataset_format": "alpaca", "train_files": ["latin1.jsonl"], "block_size": 64},
           "finetune": {"method": "lora", "r": 4}, "training": {"max_steps": 2, "per_device_train_batch_size": 2}}
    (w / "sft.yaml").write_text(yaml.safe_dump(sft))
    for name, base in (("adapter", None), ("adapter-of-model", str(w / "model"))):  # a LoRA run's final/
        (w / name).mkdir()
        adapter = {"peft_type": "LORA", "base_model_name_or_path": base}
        (w / name / "adapter_config.json").write_text(json.dumps(adapter))
    (w / "ledger").mkdir()  # a run's event ledger, as `llaunch run` writes it
    (w / "ledger" / "events.jsonl").write_text(
        '{"t": 100.0, "inc": "h.1.100", "host": "h", "pid": 1, "kind": "launch", "nodes": 1, "how": "llaunch run"}\n'
        '{"t": 101.0, "inc": "h.1.100", "host": "h", "pid": 2, "kind": "first_step", "step": 1, "tokens": 64}\n'
        '{"t": 110.0, "inc": "h.1.100", "host": "h", "pid": 2, "kind": "process_exit", "code": 0}\n')
    done = w / "done"  # a finished run with a checkpoint whose manifest is damaged
    assert main(["run", str(w / "tiny.yaml"), "--output-dir", str(done), "--dry-run"]) == 0
    (done / "final").mkdir()
    (done / "checkpoints" / "step-1").mkdir(parents=True)
    (done / "checkpoints" / "step-1" / "manifest.json").write_text('{"format": 1, "step": 1}')
    for name in ("fifo-ledger", "dir-ledger", "loop-ledger"):
        (w / name).mkdir()
    os.mkfifo(w / "fifo-ledger" / "events.jsonl")
    (w / "dir-ledger" / "events.jsonl").mkdir()
    (w / "loop-ledger" / "events.jsonl").symlink_to("events.jsonl")
    (w / "dir.yaml").mkdir()
    os.mkfifo(w / "fifo.yaml")
    (w / "loop.yaml").symlink_to("loop.yaml")
    profile = yaml.safe_load((REPO / "cluster" / "profiles" / "local.yaml").read_text())
    latin1 = yaml.safe_dump({**profile, "gpu_name": "caf\u00e9"}, allow_unicode=True).encode("latin-1")
    (w / "latin1-profile.yaml").write_bytes(latin1)
    (w / "list-profile.yaml").write_text("- local\n")
    (w / "time-profile.yaml").write_text(yaml.safe_dump({**profile, "time": "99:99:99"}))
    (w / "timeout-profile.yaml").write_text(yaml.safe_dump({**profile, "dist_timeout_s": 0}))
    (w / "watchdog-profile.yaml").write_text(yaml.safe_dump({**profile, "watchdog": {"poll_s": 0}}))
    (w / "nic-profile.yaml").write_text(yaml.safe_dump({**profile, "nics_per_node": 8}))
    (w / "nvlink-profile.yaml").write_text(yaml.safe_dump({**profile, "nvlink_gb_per_s": -1}))
    for name, container in (("mount", {"image": "/i.sif", "mounts": ["data:/data"]}),
                            ("runtime", {"image": "/i.sif", "runtime": "docker"}),
                            ("image", {"image": "/i.sif\ntouch /tmp/pwned"})):
        (w / f"{name}-profile.yaml").write_text(yaml.safe_dump({**profile, "container": container}))
    (w / "notify-profile.yaml").write_text(yaml.safe_dump({**profile, "notify": ["echo", "a list"]}))
    repo = w / "repo"  # a user's repository with an edit not yet committed
    repo.mkdir()
    for name in ("tiny.yaml", "corpus.txt"):
        (repo / name).write_bytes((w / name).read_bytes())
    (repo / "notes.md").write_text("committed\n")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, capture_output=True)
    (repo / "notes.md").write_text("edited\n")
    (w / "linked").mkdir()
    (w / "linked" / ".llaunch.lock").symlink_to(w / "afile")
    return w


def snapshot(root):
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(workspace, capsys, monkeypatch, command, message):
    before = snapshot(workspace)
    argv = [str(workspace) + arg[1:] if arg == "W" or arg.startswith("W/") else arg for arg in shlex.split(command)]
    argv = [arg.replace("=W/", f"={workspace}/") for arg in argv]
    while re.match(r"[A-Z_]+=", argv[0]):  # the environment the command runs in
        monkeypatch.setenv(*argv.pop(0).split("=", 1))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("llaunch: error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(workspace) == before


@pytest.mark.parametrize("cache", ["W/afile", "/sys/llaunch-cache"])  # a file; a place that takes no new entries
def test_an_unusable_llaunch_cache_is_one_sentence(workspace, capsys, monkeypatch, cache):
    before = snapshot(workspace)
    monkeypatch.setenv("LLAUNCH_CACHE", cache.replace("W", str(workspace), 1))
    argv = ["run", str(workspace / "tiny.yaml"), "--output-dir", str(workspace / "out"), "--dry-run",
            "data.cache_dir=null"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llaunch: error: cannot write the token cache in ") and "LLAUNCH_CACHE" in err, err
    assert err.count("\n") == 1 and snapshot(workspace) == before
