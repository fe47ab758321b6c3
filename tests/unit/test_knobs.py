"""The knob table (launcher/knobs.py) is the only place a knob is declared: every command's flags for it are
generated from the table, and `plan`, `run --dry-run` and `submit --dry-run` take the same flags to the same Plan."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from launcher.cli import build_parser, main
from launcher.knobs import BY_FIELD, KNOBS, PLANNED, cli_knobs, knob_flags
from launcher.planning.plan import Plan, TrainSetup
from launcher.planning.planner import PlanRequest
from tests.tiny_run import TINY_LLAMA, tiny_run_config

REQUEST_ONLY = {"model", "model_overrides", "runnable_only", "global_batch_tokens"}  # not knobs a user sets alone


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(subcommand_parsers()))
def test_no_command_declares_a_knob_by_hand(command):
    """An option whose dest is a knob's field, or whose spelling is a knob's flag, was added by add_knob_flags."""
    spellings, fields = knob_flags(), set(BY_FIELD)
    for action in subcommand_parsers()[command]._actions:
        owned = [flag for flag in action.option_strings if flag in spellings]
        if action.option_strings and (action.dest in fields or owned):
            knob = getattr(action, "knob", None)
            assert knob is not None, f"`llaunch {command}` declares {action.option_strings} by hand; add it " \
                                     f"to the command's knobs in launcher/knobs.py instead"
            assert action.dest == knob.field and all(spellings[flag] is knob for flag in action.option_strings)


def test_every_plan_field_is_one_row_and_a_request_field():
    """TrainSetup (the Plan's knobs), PlanRequest and the table name the same knobs, once each."""
    setup = {f.name for f in dataclasses.fields(TrainSetup)}
    request = {f.name for f in dataclasses.fields(PlanRequest)}
    planned = [k.field for k in KNOBS if k.plans]
    assert len(planned) == len(set(planned)) and len(KNOBS) == len(BY_FIELD)
    assert setup <= set(planned), f"knobs without a row: {sorted(setup - set(planned))}"
    assert set(planned) | REQUEST_ONLY == request, sorted(set(planned) ^ (request - REQUEST_ONLY))
    assert len(knob_flags()) == sum(1 + len(k.aliases) + bool(k.negation) + k.negatable for k in KNOBS)


def test_defaults_are_train_setups_and_a_config_key_names_a_real_key():
    from launcher.config import TrainConfig

    config = TrainConfig()
    for knob in KNOBS:
        if knob.plans and knob.field in TrainSetup.__dataclass_fields__ and not knob.planner:
            assert knob.default == getattr(TrainSetup(), knob.field)
        if knob.config:
            section, _, key = knob.config.rpartition(".")
            assert hasattr(getattr(config, section) if section else config, key), knob.config


# Every planner knob a one-rank CPU job can force, spelled as `plan`, `run` and `submit` all take it.
SHARED = ["--strategy", "fsdp", "--offload", "none", "--micro-batch", "2", "--gradient-accumulation-steps", "3",
          "--seq-len", "32", "--precision", "fp32", "--activation-checkpointing", "--method", "full",
          "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--optimizer", "adamw_torch", "--attention", "eager",
          "--loss-chunk-tokens", "0", "--global-batch", "6"]


@pytest.mark.parametrize("command", PLANNED)
def test_plan_run_and_submit_parse_the_same_flags_to_the_same_knobs(command):
    positional = {"plan": ["--model", "7b"], "run": ["c.yaml"], "submit": ["c.yaml"]}[command]
    aliases = ["--gpus", "2"] if command != "submit" else ["--gpus-per-node", "2"]
    args = build_parser().parse_args([command, *positional, *SHARED, *aliases])
    if command == "run":
        from launcher.cli.run import parse_rest

        args = parse_rest(args)
    knobs = cli_knobs(args)
    assert knobs == {"strategy": "fsdp", "offload": "none", "micro_batch": 2, "gradient_accumulation_steps": 3,
                     "seq_len": 32, "precision": "fp32", "activation_checkpointing": "full", "method": "full",
                     "lora_r": 4, "lora_targets": ["q_proj", "v_proj"], "optimizer": "adamw_torch",
                     "attention": "eager", "loss_chunk_tokens": 0, "global_batch": 6, "gpus_per_node": 2}


def test_plan_run_dry_run_and_submit_dry_run_make_the_same_plan(tmp_path, capsys):
    """One CPU rank: the hardware flags differ (plan describes the CPU, run probes it, submit reads the local
    profile); every other knob is the same flag, and the three plans hold the same knobs."""
    config = tiny_run_config(tmp_path)
    overrides = [f"--model-override={key}={value}" for key, value in TINY_LLAMA.items()]
    assert main(["plan", "--model", "tinyllama-1.1b", *overrides, "--device", "cpu", *SHARED,
                 "-o", str(tmp_path / "plan.yaml")]) == 0
    assert main(["run", str(config), "--output-dir", str(tmp_path / "run"), "--dry-run", *SHARED]) == 0
    capsys.readouterr()
    assert main(["submit", str(config), "--cluster", "local", "--nodes", "1", "--gpus-per-node", "0",
                 "--output-dir", str(tmp_path / "sub"),
                 "--dry-run", *SHARED]) == 0
    printed = capsys.readouterr().out
    submitted = Plan.from_dict(yaml.safe_load(printed.split("when submitted):\n", 1)[1].split("# nothing written")[0]))
    plans = [Plan.load(tmp_path / "plan.yaml"), Plan.load(tmp_path / "run" / "plan.yaml"), submitted]
    knobs = [plan.knobs() for plan in plans]
    assert knobs[0] == knobs[1] == knobs[2], knobs
    assert (knobs[0].strategy, knobs[0].micro_batch, knobs[0].gradient_accumulation_steps, knobs[0].lora_targets,
            knobs[0].attention, knobs[0].world_size) == ("fsdp", 2, 3, ["q_proj", "v_proj"], "eager", 1)
