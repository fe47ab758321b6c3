"""The event ledger (append, torn lines) and the goodput analysis on synthetic ledgers: categories that sum to
the wall time, progress lost to a failure, MTBF, and the checkpoint interval formulas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launcher.observe import goodput

from launcher.observe import event_ledger
from launcher.jobdir.layout import JobDir
from launcher.cli import main
from launcher import env
from launcher.observe.goodput import CATEGORIES


def test_append_writes_one_fsynced_line_per_event_with_who_and_when(tmp_path, monkeypatch):
    monkeypatch.setenv(env.INCARNATION.name, "job.0")
    event_ledger.append(tmp_path, event_ledger.SAVE, step=10, seconds=1.5)
    event_ledger.append(tmp_path, event_ledger.EXIT, t=5.0, code=0, cause="finished")
    first, second = event_ledger.read(tmp_path)
    assert first == {"t": 5.0, "inc": "job.0", "host": first["host"], "pid": os.getpid(), "kind": "exit",
                     "code": 0, "cause": "finished"}
    assert second["kind"] == "save" and second["step"] == 10 and second["seconds"] == 1.5


def test_reader_skips_a_torn_last_line_and_lines_of_other_shapes(tmp_path):
    event_ledger.append(tmp_path, event_ledger.LAUNCH)
    with open(JobDir(tmp_path).events, "ab") as f:
        f.write(b'[1, 2]\n{"t": 3, "kind": "save", "st')  # what kill -9 in the middle of a write leaves
    assert [e["kind"] for e in event_ledger.read(tmp_path)] == ["launch"]
    event_ledger.append(tmp_path, event_ledger.EXIT)  # and appending goes on after it
    assert [e["kind"] for e in event_ledger.read(tmp_path)] == ["launch", "exit"]


# (a damaged line, what the warning says about it): wrong types, numbers JSON cannot hold, torn, not UTF-8
DAMAGED_LINES = [
    (b'{"t": 3, "kind": "save", "seconds": "slow"}', "'seconds' is 'slow', not a number from 0 to 1e+12"),
    (b'{"t": Infinity, "kind": "save"}', "'t' is inf, not a number"),
    (b'{"t": 3, "kind": "save", "seconds": NaN}', "'seconds' is nan, not a number"),
    (b'{"t": 3, "kind": "save", "seconds": 1e999}', "'seconds' is inf, not a number"),
    (b'{"t": 1e300, "kind": "launch"}', "'t' is 1e+300, not a number"),  # an infinite wall time once summed
    (b'{"t": -5, "kind": "launch"}', "'t' is -5, not a number"),
    (b'{"t": 3, "kind": "restore", "step": "4"}', "'step' is '4', not an integer"),
    (b'{"t": 3, "kind": "steps", "step": 2.5}', "'step' is 2.5, not an integer"),
    (b'{"t": 3, "kind": "steps", "step": 100000000000000000000000}', "'step' is 100000000000000000000000, not"),
    (b'{"t": 3, "kind": "launch", "nodes": true}', "'nodes' is True, not an integer"),
    (b'{"t": 3, "kind": "submit", "warning_s": [90]}', "'warning_s' is [90], not a number"),
    (b'{"t": 3, "kind": 7}', "'kind' is 7, not text"),
    (b'{"t": 3, "kind": "exit", "cause": {"code": 1}}', "'cause' is {'code': 1}, not text"),
    (b'{"t": 3, "kind": "save", "ok": "yes"}', "'ok' is 'yes', not true or false"),
    (b'{"kind": "save"}', "no 't'"),
    (b'[1, 2]', "not a JSON object"),
    (b'{"t": 3, "kind": "sa', "not JSON"),  # torn by a kill -9, closed by the next append
    (b'\xff\xfe{"t": 3, "kind": "save"}', "not UTF-8"),
    (b"[" * 100_000, "not JSON"),  # nested deeper than the parser goes
]


@pytest.mark.parametrize("line, why", DAMAGED_LINES, ids=[why for _, why in DAMAGED_LINES])
def test_a_damaged_line_is_skipped_with_a_warning_and_goodput_still_answers(tmp_path, capsys, line, why):
    event_ledger.append(tmp_path, event_ledger.LAUNCH, t=1.0, inc="a")
    with open(JobDir(tmp_path).events, "ab") as f:
        f.write(line + b"\n")
    event_ledger.append(tmp_path, event_ledger.EXIT, t=5.0, inc="a", code=1, cause="failed")
    assert [e["kind"] for e in event_ledger.read(tmp_path)] == ["launch", "exit"]
    err = capsys.readouterr().err
    assert f"warning: skipped 1 damaged line(s) of {JobDir(tmp_path).events} (line 2: {why}" in err, err
    assert main(["goodput", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out, parse_constant=lambda name: pytest.fail(f"--json printed {name}"))
    assert report["wall_s"] == 4.0 and report["failures"] == 1 and "skipped 1 damaged line(s)" in err


def test_a_line_still_being_written_is_skipped_without_a_warning(tmp_path, capsys):
    event_ledger.append(tmp_path, event_ledger.LAUNCH, t=1.0)
    with open(JobDir(tmp_path).events, "ab") as f:
        f.write(b'{"t": 2, "kind": "exit", "co')  # another process's write, not finished yet
    assert [e["kind"] for e in event_ledger.read(tmp_path)] == ["launch"] and capsys.readouterr().err == ""


def test_extreme_but_valid_figures_give_a_finite_report(tmp_path, capsys):
    """The largest times and durations the reader lets through, failures before any running time, a save of
    the same instant: every figure stays finite, so --json is valid JSON."""
    for t, kind, fields in ((0, "submit", {"warning_s": 1e12}), (0, "launch", {"nodes": 10**12}),
                            (0, "save", {"seconds": 1e12, "step": 10**12}), (0, "exit", {"cause": "failed"}),
                            (1e12, "launch", {}), (1e12, "first_step", {"step": 0}),
                            (1e12, "save_background", {}), (1e12, "exit", {"cause": "SIGKILL"})):
        event_ledger.append(tmp_path, kind, t=t, inc=str(t), **fields)
    assert main(["goodput", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"--json printed {name}"))
    assert report["failures"] == 2 and report["mtbf_s"] == 0.0


def test_a_ledger_that_cannot_be_written_warns_once_and_never_raises(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(event_ledger, "_warned", False)
    event_ledger.append(tmp_path / "missing", event_ledger.LAUNCH)
    event_ledger.append(tmp_path / "missing", event_ledger.EXIT)
    assert capsys.readouterr().err.count("cannot append to the event ledger") == 1


def test_appends_of_concurrent_processes_never_interleave(tmp_path):
    code = ("import sys; from launcher.observe import event_ledger\n"
            "for i in range(100): event_ledger.append(sys.argv[1], 'steps', step=i, pad='x' * 3000)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(3)]
    assert all(p.wait(60) == 0 for p in procs)
    lines = [line for line in JobDir(tmp_path).events.read_text().splitlines() if line]  # blank: see append
    assert len(lines) == 300 and all(json.loads(line)["kind"] == "steps" for line in lines)


def event(t, kind, inc="a", **fields):
    return {"t": t, "kind": kind, "inc": inc, **fields}


def killed_and_resumed() -> list[dict]:
    """Saves every 10 steps of 1 s; killed half a step after step 25 (saved at 20), down 30.5 s, resumed at 20."""
    events = [event(0, "launch", nodes=2), event(2, "process_start"), event(5, "model_built"),
              event(7, "first_step", step=1)]
    events += [event(7 + s, "steps", step=1 + s) for s in range(1, 25)]  # steps 2..25 at t 8..31
    events += [event(16.5, "save", step=10, seconds=0.5), event(26.5, "save", step=20, seconds=0.5),
               event(19.5, "eval", step=13, seconds=0.5)]
    events += [event(31.5, "exit", code=-9, cause="SIGKILL")]
    events += [event(62, "launch", inc="b", nodes=2), event(63, "process_start", inc="b"),
               event(66, "restore", inc="b", step=20, seconds=2.0), event(68, "first_step", inc="b", step=21)]
    events += [event(68 + s, "steps", inc="b", step=21 + s) for s in range(1, 10)]
    events += [event(78, "save", inc="b", step=30, seconds=0.5), event(79, "exit", inc="b", code=0, cause="finished")]
    return events


def test_categories_partition_the_wall_time_and_the_recomputed_steps_are_lost():
    report = goodput.analyse(killed_and_resumed())
    assert report.wall_s == 79
    assert abs(sum(report.seconds.values()) - report.wall_s) <= 0.02 * report.wall_s
    assert set(report.seconds) == set(CATEGORIES)
    assert report.steps_lost == 5  # steps 21..25 done twice
    assert report.seconds["lost"] == pytest.approx(4.5 + 0.5)  # steps 21..25 after the save, and the half step it died in
    assert report.seconds["down"] == 30.5
    assert report.seconds["restore"] == 2.0 and report.seconds["eval"] == 0.5
    assert report.seconds["checkpoint"] == pytest.approx(1.5)
    assert report.seconds["startup"] == pytest.approx(7 + (68 - 62) - 2.0)
    assert report.failures == 1 and [i.cause for i in report.incarnations] == ["SIGKILL", "finished"]
    assert report.running_s == 79 - 30.5
    assert report.mtbf_s == pytest.approx(report.running_s)
    assert report.save_cost_s == pytest.approx(0.5) and report.restart_cost_s == pytest.approx(6.0)
    assert report.goodput == pytest.approx(report.seconds["productive"] / 79)


def test_requeued_job_counts_its_queue_wait_and_the_lanes_follow_the_incarnations():
    events = [event(0, "submit", warning_s=90), event(40, "launch", inc="7.0", seconds=38), event(41, "process_start", inc="7.0"),
              event(45, "first_step", inc="7.0", step=1), event(60, "save", inc="7.0", step=15, seconds=1),
              event(61, "signal", inc="7.0", name="SIGUSR2"), event(62, "save", inc="7.0", step=16, seconds=1),
              event(62.5, "train_end", inc="7.0", step=16, cause="preempted"),
              event(63, "exit", inc="7.0", cause="SIGUSR2"), event(64, "requeue", inc="7.0"),
              event(184, "launch", inc="7.1", seconds=119), event(185, "process_start", inc="7.1"),
              event(188, "restore", inc="7.1", step=16, seconds=2), event(190, "first_step", inc="7.1", step=17),
              event(200, "exit", inc="7.1", cause="finished")]
    report = goodput.analyse(events)
    assert report.seconds["queue"] == pytest.approx(40 + 120)
    assert report.seconds["lost"] == 0 and report.steps_lost == 0  # it saved before it went ...
    assert report.failures == 0 and report.incarnations[0].saved_on_signal  # ... so that was no failure
    assert report.warning_s == 90
    assert {p.lane for p in report.pieces if p.category == "queue"} == {0, 1}
    assert report.seconds["shutdown"] == pytest.approx(0.5)
    assert abs(sum(report.seconds.values()) - 200) < 1e-9
    # SLURM started the second attempt at 180: the 4 s until the node task's launch event are start-up
    events[10] = event(184, "launch", inc="7.1", seconds=116, start_t=180)
    report = goodput.analyse(events)
    assert report.seconds["queue"] == pytest.approx(40 + 116)
    assert report.seconds["startup"] == pytest.approx(5 + 4 + 4)  # first attempt; 180-184; to the first step
    assert abs(sum(report.seconds.values()) - 200) < 1e-9


def test_exit_causes_and_which_of_them_are_failures():
    assert [event_ledger.exit_cause(code) for code in (0, 75, 2, -9, 137, 1)] == \
        ["finished", "preempted", "user error", "SIGKILL", "SIGKILL", "failed"]
    events = [event(0, "launch"), event(5, "exit", cause="user error"), event(10, "launch", inc="b"),
              event(20, "exit", inc="b", cause="failed")]
    assert goodput.analyse(events).failures == 1  # a config to fix is not the cluster failing


def test_hang_and_straggler_time_come_out_of_training():
    events = [event(0, "launch"), event(1, "first_step", step=1), event(50, "hang", seconds=20),
              event(60, "straggler", seconds=4), event(70, "exit", cause="finished")]
    report = goodput.analyse(events)
    assert report.seconds["hang"] == 20 and report.seconds["straggler"] == 4
    assert report.seconds["productive"] == pytest.approx(70 - 1 - 24)


def test_young_interval_and_the_availability_optimal_refinement():
    assert goodput.young_interval(2, 600) == pytest.approx(48.99, abs=0.01)
    best = goodput.availability_optimal_interval(2, 0, 600)
    assert 45 < best < 50  # the same to first order; saves hit by failures shorten it a little
    around = [goodput.expected_efficiency(best * f, 2, 0, 600) for f in (0.8, 1.0, 1.25)]
    assert around[1] > around[0] and around[1] > around[2]
    assert goodput.availability_optimal_interval(2, 0, 600, detection_s=90) == 90


def test_overhead_cap_and_preemption_warning_clamp_the_interval():
    cadence = goodput.choose_interval(save_cost_s=2, restart_cost_s=30, mtbf_s=60, mtbf_source="measured")
    assert cadence.optimal_s < 40 and cadence.interval_s == pytest.approx(40)  # 2 s saves at most 5 % of the time
    assert "5%" in cadence.describe()
    warned = goodput.choose_interval(10, 30, 1e5, "prior", warning_s=5)
    assert "preemption warning" in warned.clamp


def test_mtbf_falls_back_to_the_prior_until_a_failure_is_seen():
    assert goodput.estimate_mtbf(3600, 3, 4)[0] == 1200
    prior, source = goodput.estimate_mtbf(3600, 0, 4)
    assert prior == goodput.PRIOR_NODE_MTBF_S / 4 and source.startswith("prior")


def test_steps_after_the_last_window_are_counted_from_the_time_they_took():
    events = killed_and_resumed()
    coarse = [e for e in events if e["kind"] != "steps" or e["step"] % 5 == 1]  # a window every 5 steps
    report = goodput.analyse(coarse)
    assert report.incarnations[0].window_steps == 5
    assert report.steps_lost in (4, 5)  # step 21 seen, then 4.5 s of ~1 s steps (at most 4 before a window)
    slow_exit = [{**e, "t": 33.5} if e["kind"] == "exit" and e["t"] == 31.5 else e for e in events]
    assert goodput.analyse(slow_exit).steps_lost == 5  # every step seen: the 2.5 s before the exit are teardown


def test_ettr_what_if_falls_with_more_nodes():
    report = goodput.analyse(killed_and_resumed())
    ratios = goodput.what_if(report, interval_s=10)
    assert ratios[1] == pytest.approx(1 - 0.5 / 10 - (6 + 10 / 2) / 48.5, abs=1e-3)  # one failure in 48.5 s running
    assert ratios[10] == ratios[100] == 0  # ten times the nodes fail every 4.9 s: nothing gets done
    assert goodput.ettr(1, 10, 0.5, 6, 1e9) == pytest.approx(1 - 0.05, abs=1e-6)


def test_status_shows_the_goodput_of_a_submitted_job(tmp_path, monkeypatch):
    from cluster import jobs
    from launcher.cli.status import describe

    monkeypatch.setenv("LLAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(jobs, "job_state", lambda job_id, env: jobs.JobState("COMPLETED"))
    out = tmp_path / "job"
    out.mkdir()
    jobs.JobRecord("42", "tiny", str(out), str(out / "slurm"), nodes=2, cluster="local").save()
    assert not any(line.startswith("  goodput") for line in describe("42"))  # no ledger yet: nothing to say
    for e in killed_and_resumed():
        event_ledger.append(out, e["kind"], **{k: v for k, v in e.items() if k != "kind"})
    line = next(line for line in describe("42") if line.startswith("  goodput"))
    assert line.startswith("  goodput 36.1% of 1 m 19 s over 2 incarnation(s): queue 0.0 s, restore 2.0 s, lost 5.0 s")


def test_status_says_why_a_ledger_it_cannot_read_gives_no_goodput(tmp_path):
    from launcher.cli.goodput import summary_line

    os.mkfifo(JobDir(tmp_path).events)  # read as a file, it would block status forever
    assert summary_line(tmp_path) == f"goodput unknown: {JobDir(tmp_path).events} is not a regular file; " \
                                     f"move it away (llaunch keeps a plain file there)."


def fake_command(folder, name, output, status=0):
    script = folder / name
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    script.chmod(0o755)


def test_queue_wait_comes_from_scontrol_or_else_sacct(tmp_path, monkeypatch):
    from cluster import job_events

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake_command(tmp_path, "scontrol", "JobId=58 JobName=x JobState=RUNNING Restarts=1 "
                 "SubmitTime=2026-11-30T02:00:00 EligibleTime=2026-11-30T02:02:00 StartTime=2026-11-30T02:02:30")
    times = job_events.queue_times("58")
    assert times["seconds"] == 150 and times["start_t"] - times["submit_t"] == 150
    fake_command(tmp_path, "scontrol", "", status=1)  # forgotten by scontrol (MinJobAge): ask accounting
    fake_command(tmp_path, "sacct", "2026-11-30T02:00:00|2026-11-30T02:00:40")
    assert job_events.queue_times("58")["seconds"] == 40
    fake_command(tmp_path, "sacct", "2026-11-30T02:00:00|Unknown")  # still pending: nothing to say
    assert job_events.queue_times("58") == {}


def test_a_relaunch_whose_start_time_sorts_before_the_previous_exit_still_counts_the_lost_steps():
    """A launch's time is its process's start time, which the kernel keeps coarsely: seen in a real run, the
    resumed `llaunch run` started 'before' the killed one wrote its exit."""
    events = [
        {"t": 0.0, "inc": "a", "kind": "launch"}, {"t": 1.0, "inc": "a", "kind": "first_step", "step": 1},
        {"t": 2.0, "inc": "a", "kind": "save", "step": 20, "seconds": 0.1},
        {"t": 2.9, "inc": "a", "kind": "steps", "step": 25},
        {"t": 2.95, "inc": "b", "kind": "launch"}, {"t": 3.0, "inc": "a", "kind": "exit", "code": 1, "cause": "failed"},
        {"t": 4.0, "inc": "b", "kind": "process_start"}, {"t": 5.0, "inc": "b", "kind": "restore", "step": 20},
        {"t": 5.1, "inc": "b", "kind": "first_step", "step": 21}, {"t": 6.0, "inc": "b", "kind": "train_end", "step": 30},
        {"t": 6.5, "inc": "b", "kind": "exit", "code": 0, "cause": "finished"},
    ]
    report = goodput.analyse(events)
    assert abs(report.steps_lost - 5) <= 1  # 21..25, killed right after step 25
    assert [i.cause for i in goodput.timeline(events)[1]] == ["failed", "finished"]
    assert abs(sum(report.seconds.values()) - report.wall_s) < 1e-6


def test_the_unsaved_steps_of_a_last_incarnation_that_failed_are_lost_though_none_redoes_them():
    """The job ends with the killed incarnation (no requeue): steps 21..25 after its step-20 save are lost."""
    events = [e for e in killed_and_resumed() if e["inc"] == "a"]
    report = goodput.analyse(events)
    assert report.seconds["lost"] == pytest.approx(4.5 + 0.5)
    assert report.seconds["productive"] == pytest.approx(31.5 - 7 - 4.5 - 1.5 - 0.5)
    finished = [e for e in events if e["kind"] != "exit"] + [event(31.5, "exit", code=0, cause="finished")]
    assert goodput.analyse(finished).seconds["lost"] == 0


def test_an_incarnation_killed_unseen_is_lost_for_one_step_window_then_down():
    """Every process of incarnation a SIGKILLed (no exit event) 20 s after step 25, b launched 131 s after it:
    a lived at most one step window (60 s) past its last event, which is lost with its unsaved steps 21..25; the
    rest until b's launch is down. a is a failure, killed."""
    events = [e for e in killed_and_resumed() if e["kind"] != "exit" or e["inc"] != "a"]
    events = [e if e["inc"] == "a" else {**e, "t": e["t"] + 100} for e in events]
    report = goodput.analyse(events)
    assert [(i.cause, i.end) for i in report.incarnations] == [(event_ledger.KILLED, 31 + 60), ("finished", 179)]
    assert report.seconds["lost"] == pytest.approx(4.5 + 60)
    assert report.seconds["down"] == pytest.approx(162 - 91)
    assert report.failures == 1 and report.steps_lost == 5
    assert abs(sum(report.seconds.values()) - report.wall_s) < 1e-9


def test_the_newest_incarnation_killed_unseen_loses_its_unsaved_steps_once_its_launcher_is_gone():
    events = [e for e in killed_and_resumed() if e["inc"] == "a" and e["kind"] != "exit"]
    running = goodput.analyse(events)  # its launcher may still run: the steps since the save are training
    assert running.incarnations[0].cause is None and running.seconds["lost"] == 0
    killed = goodput.analyse(events, alive=False)
    assert (killed.incarnations[0].cause, killed.incarnations[0].end, killed.wall_s) == (event_ledger.KILLED, 31, 31)
    assert killed.seconds["lost"] == pytest.approx(4.5)  # steps 21..25, after the step-20 save
    assert killed.seconds["productive"] == pytest.approx(running.seconds["productive"] - 4.5)
    assert killed.failures == 1


def test_a_launcher_is_known_gone_only_on_its_own_host_by_its_pid_and_start_time():
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here, now = socket.gethostname(), time.time()
    launch = {"t": now, "kind": "launch", "inc": "a", "host": here, "pid": os.getpid()}
    assert event_ledger.launcher_alive([launch])
    assert not event_ledger.launcher_alive([{**launch, "pid": gone.pid}])
    assert not event_ledger.launcher_alive([{**launch, "t": 1.0}])  # the pid is a younger process's now
    assert event_ledger.launcher_alive([{**launch, "pid": gone.pid, "host": here + "-elsewhere"}])
    assert event_ledger.launcher_alive([])
