"""`llaunch plan` / `llaunch probe` as a user runs them: exit codes, JSON, the Plan file, and speed."""

import json
import subprocess
import sys
import time

import pytest

from launcher.cli import main
from launcher.plan import Plan


def test_plan_json_has_peak_reserved_and_every_component(capsys):
    assert main(["plan", "--model", "tinyllama-1.1b", "--gpu", "H100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    memory = plan["memory"]
    for key in ("peak_bytes", "reserved_bytes", "weights", "grads", "optimizer", "activations", "logits_loss",
                "comm_buffers", "context_reserve"):
        assert memory[key] >= 0, key
    assert memory["peak_bytes"] < memory["reserved_bytes"] <= memory["limit_bytes"]


def test_plan_shows_the_chunked_loss_logits_term(capsys):
    """Llama-3 8B at 2 x 2048 tokens: the loss's logits term is one 512-token chunk, not 4096 tokens' worth."""
    terms = {}
    for chunk in ("0", "512"):
        argv = ["--model", "8b", "--gpu", "H100", "--method", "lora", "--micro-batch", "2", "--loss-chunk-tokens", chunk]
        assert main(["plan", *argv, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        terms[chunk] = (plan["memory"]["logits_loss"], plan["memory"]["peak_bytes"], plan["loss_chunk_tokens"])
    assert terms["0"] == (2 * 2048 * 128256 * 12, terms["0"][1], 0)
    assert terms["512"][0] == 512 * 128256 * 12 and terms["512"][2] == 512
    assert terms["0"][1] - terms["512"][1] == terms["0"][0] - terms["512"][0]  # the whole saving reaches the peak
    assert main(["plan", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in next(line for line in lines if "logits" in line).split("┃")]
    row = [cell.strip() for cell in next(line for line in lines if line.startswith("│ ddp")).split("│")]
    assert row[header.index("logits")] == "0.7"  # GiB: 512 x 128256 x 12 B


def test_plan_writes_a_plan_file_that_run_can_load(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "7b", "--gpus", "8", "--gpu", "H100", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "chosen:" in table and "why:" in table and "reserved/limit" in table
    plan = Plan.load(out)
    assert plan.model == "7b" and plan.gpus_per_node == 8 and plan.params == 6738415616


@pytest.mark.parametrize("argv, message", [
    (["--model", "lama-7b"], "did you mean"),
    (["--model", "7b", "--gpus", "0"], "--gpus must be a positive integer"),
    (["--model", "7b", "--gpu-mem", "abc"], "is not a size"),
    (["--model", "405b", "--gpu", "L40S", "--strategy", "ddp"], "does not fit"),
    (["--model", "7b", "--global-batch", "lots"], "--global-batch"),
    (["--model", "7b", "--loss-chunk-tokens", "-1"], "--loss-chunk-tokens must be 0"),
])
def test_bad_inputs_exit_2_with_one_sentence(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_malformed_config_json_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{")
    assert main(["plan", "--model", str(tmp_path / "config.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_probe_works_without_a_gpu(capsys):
    assert main(["probe", "--json"]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert probed["cpu_cores"] >= 1 and "gpus" in probed


def test_plan_70b_answers_fast_without_importing_torch():
    """The issue's bound is 1 s on the CPU machine; allow 3 s for a loaded CI box, and forbid torch outright."""
    code = ("import sys, time; t = time.time(); from launcher.cli import main; "
            "rc = main(['plan', '--model', '70b', '--gpus', '8', '--gpu', 'H100', '--json']); "
            "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); "
            "print(time.time() - t, file=sys.stderr)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.time() - start < 3.0


def test_output_into_a_closed_pipe_ends_quietly():
    """`llaunch plan ... | head -1`: the reader leaves early; no BrokenPipeError traceback, the shell's 141."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "plan", "--model", "7b", "--gpu", "H100", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""
