"""Where a job's wall time went, from its event ledger, and the checkpoint interval that the measurements ask for.

The timeline: between two consecutive events the time belongs to what the later event reports (a save's
`seconds` are checkpoint time, a restore's are restore time, a launch's are queue wait, and the time from
SLURM's start of the attempt to the node task's launch event is start-up); the rest of the gap belongs to the
state the job was in (queued, down, starting up, training). So the categories partition the
wall time by construction. Training that a later incarnation did again (its steps lie beyond the checkpoint
it resumed from) is moved from productive to lost. An incarnation whose every process was SIGKILLed leaves no
exit event: it ended killed where the next launch shows it was gone, having lived at most one step window
(event_ledger.STEP_WINDOW_S, the longest a training rank stays silent) past its last event, which time is
lost, the rest down; the newest one, once its launcher is known gone (`alive` False), at its last event.

The interval formulas assume exponential failures with mean M (the job's MTBF), a blocking save cost C and
a restart cost R: Young's T = sqrt(2CM), and the availability-optimal T, which maximises the expected
fraction of wall time spent on useful work when failures can also strike during saves and restarts (the
objective of arXiv 2410.18124, solved numerically on Daly's exact expected-time model; it is never below the
hang detection latency). Meta's ETTR model (arXiv 2410.21680) projects the ratio at more nodes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from launcher.observe import event_ledger

PRODUCTIVE = "productive"
LOST = "lost"
# Every category, in the order tables and legends show them; the colour is the picture's.
CATEGORIES = {
    PRODUCTIVE: "#55a868", "queue": "#bbbbbb", "down": "#eeeeee", "startup": "#4c72b0", "restore": "#8172b3",
    "checkpoint": "#dd8452", "eval": "#ccb974", "shutdown": "#8c8c8c", LOST: "#c44e52", "hang": "#000000", "straggler": "#937860",
}
# The category of the time an event reports in its own `seconds`.
OWN_CATEGORY = {
    event_ledger.LAUNCH: "queue", event_ledger.PROCESS_START: "startup", event_ledger.DIST_INIT: "startup", event_ledger.MODEL_BUILT: "startup",
    event_ledger.FIRST_STEP: "startup", event_ledger.RESTORE: "restore", event_ledger.SAVE: "checkpoint", event_ledger.FINAL_SAVED: "checkpoint",
    event_ledger.EVAL: "eval", event_ledger.HANG: "hang", event_ledger.STRAGGLER: "straggler",
}
# The prior failure rate before a job has seen a failure: Meta's RSC-1 cluster saw about 6.5 failures per
# 1000 node-days (arXiv 2410.21680), so one node fails about every 150 days.
PRIOR_NODE_MTBF_S = 150 * 86400.0
DEFAULT_OVERHEAD_CAP = 0.05
FINISHED = "finished"


@dataclass
class Piece:
    """A stretch of the timeline in one category; steps (from, to] it trained, None where unknown."""

    start: float
    end: float
    category: str
    lane: int | None
    step_from: int | None = None
    step_to: int | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Incarnation:
    """One start of the job (a launch, a requeue, a restart of the ranks) until its exit."""

    id: str
    lane: int
    start: float
    end: float | None = None
    cause: str | None = None      # finished, failed, a signal name, killed; None while running (or restarted)
    nodes: int = 1
    restored_step: int | None = None
    last_step: int | None = None
    saved_on_signal: bool = False  # a preemption it saved for: no progress lost, so not a failure for the MTBF
    window_steps: int = 1  # the most steps between two of its step windows


@dataclass
class Report:
    wall_s: float
    seconds: dict[str, float]
    goodput: float
    incarnations: list[Incarnation]
    failures: int
    running_s: float
    mtbf_s: float | None
    nodes: int
    save_cost_s: float | None
    restart_cost_s: float | None
    steps_lost: int
    step_time_s: float | None
    interval_s: float | None          # the measured training time between saves
    save_background_s: float | None   # async saves: mean time until published, overlapping training
    warning_s: float | None           # the preemption warning the job was submitted with (SLURM --signal)
    pieces: list[Piece] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("pieces")
        return data


def _split(piece: Piece, at_step: int) -> list[Piece]:
    """Cut a productive piece where it passed `at_step`; the part beyond is lost."""
    if piece.step_to is None:
        lost = piece.step_from is not None and piece.step_from >= at_step
        return [Piece(**{**asdict(piece), "category": LOST if lost else piece.category})]
    if piece.step_to <= at_step:
        return [piece]
    if piece.step_from is None or piece.step_from >= at_step or piece.step_to == piece.step_from:
        return [Piece(**{**asdict(piece), "category": LOST})]
    cut = piece.start + piece.seconds * (at_step - piece.step_from) / (piece.step_to - piece.step_from)
    return [Piece(**{**asdict(piece), "end": cut, "step_to": at_step}),
            Piece(**{**asdict(piece), "start": cut, "step_from": at_step, "category": LOST})]


def timeline(events: list[dict], alive: bool = True) -> tuple[list[Piece], list[Incarnation]]:
    """The ledger's events as pieces of time, each in one category, and the job's incarnations; `alive`:
    whether the newest incarnation may still run (False: one without an exit event was killed)."""
    builder = _TimelineBuilder()
    for event in sorted(events, key=lambda e: e["t"]):
        builder.add(event)
    last = builder.incarnations[-1] if builder.incarnations else None
    if not alive and last is not None and last.end is None:
        last.end, last.cause = builder.prev, event_ledger.KILLED
    for piece in builder.pieces:
        if piece.lane is None:
            piece.lane = max(0, len(builder.incarnations) - 1)
    return builder.pieces, builder.incarnations


class _TimelineBuilder:
    """Walks the events in time order: the time since the previous event goes to the current state (or, for
    an event that says how long it took, partly to its own category); then the event moves the state."""

    def __init__(self):
        self.pieces: list[Piece] = []
        self.incarnations: list[Incarnation] = []
        self.state, self.step, self.prev = "down", None, None

    def add(self, event: dict) -> None:
        kind, t = event["kind"], float(event["t"])
        current = self.incarnations[-1] if self.incarnations else None
        if kind == event_ledger.LAUNCH and current is not None and current.end is None:
            self._killed(current, t)
        self._time_until(event, kind, t, current.lane if current and current.end is None else None)
        starts = kind == event_ledger.LAUNCH or (kind == event_ledger.PROCESS_START and (current is None or current.end is not None
                                                                    or event.get("inc") != current.id))
        if starts:
            current = self._start(event, t, current)
        else:
            self._transition(event, kind, t, current)
        if kind == event_ledger.STEPS and current is not None and current.last_step is not None:
            current.window_steps = max(current.window_steps, int(event.get("step", 0)) - current.last_step)
        if isinstance(event.get("step"), int):
            self.step = event["step"]
            if current is not None and current.end is None:
                current.last_step = self.step

    def _time_until(self, event: dict, kind: str, t: float, lane: int | None) -> None:
        prev = self.prev
        if prev is not None and t > prev:
            end = t
            started = event.get("start_t") if kind == event_ledger.LAUNCH else None
            if isinstance(started, (int, float)) and prev < started < t:
                # SLURM started the attempt at start_t: what follows until the node task reports is start-up
                self.pieces.append(Piece(started, t, "startup", lane))
                end = started
            own = min(float(event.get("seconds") or 0.0), end - prev) if kind in OWN_CATEGORY else 0.0
            to_step = event.get("step") if self.state == PRODUCTIVE else None
            if end - own > prev:
                self.pieces.append(Piece(prev, end - own, self.state, lane, self.step, to_step))
            if own > 0:
                self.pieces.append(Piece(end - own, end, OWN_CATEGORY[kind], lane, self.step, self.step))
        self.prev = max(t, prev or t)

    def _killed(self, current: Incarnation, launch_t: float) -> None:
        """A launch while `current` has no exit: it was killed unseen, at most one step window after its last
        event; that time is lost (the state it was in died with it), what follows until the launch is down."""
        died = min(launch_t, self.prev + event_ledger.STEP_WINDOW_S)
        if died > self.prev:
            self.pieces.append(Piece(self.prev, died, LOST, current.lane, self.step, None))
            self.prev = died
        current.end, current.cause, self.state = died, event_ledger.KILLED, "down"

    def _start(self, event: dict, t: float, current: Incarnation | None) -> Incarnation:
        if current is not None and current.end is None:
            current.end = t  # restarted without an exit seen (torchrun restarted the ranks)
        current = Incarnation(str(event.get("inc")), len(self.incarnations), t, nodes=int(event.get("nodes") or 1))
        self.incarnations.append(current)
        for piece in self.pieces:
            if piece.lane is None:
                piece.lane = current.lane  # the queue or downtime before an incarnation is drawn in its lane
        self.state, self.step = "startup", None
        return current

    def _transition(self, event: dict, kind: str, t: float, current: Incarnation | None) -> None:
        if kind in (event_ledger.SUBMIT, event_ledger.REQUEUE):
            self.state = "queue"
        elif kind == event_ledger.TRAIN_END:
            self.state = "shutdown"
            if current is not None:
                current.saved_on_signal = event.get("cause") == "preempted"
        elif kind == event_ledger.EXIT and current is not None:
            # Launch times come from process start times, which the kernel keeps to within a second or so, so
            # the next incarnation's launch may sort before this exit: the exit ends the incarnation it names.
            ended = next((i for i in self.incarnations if i.id == str(event.get("inc"))), current)
            ended.cause = str(event.get("cause") or "failed")
            if ended is current:
                current.end, self.state = t, "down"
        elif kind == event_ledger.RESTORE and current is not None:
            current.restored_step = int(event.get("step") or 0)
        elif kind == event_ledger.FIRST_STEP and current is not None:
            self.state = PRODUCTIVE
            resumed_at = current.restored_step or 0
            self.pieces = [part for piece in self.pieces for part in
                           (_split(piece, resumed_at) if piece.category == PRODUCTIVE and piece.lane != current.lane
                            else [piece])]


def analyse(events: list[dict], alive: bool = True) -> Report:
    """The goodput report of one job's events; `alive`: whether its newest incarnation may still run
    (event_ledger.launcher_alive)."""
    pieces, incarnations = timeline(events, alive)
    last = incarnations[-1] if incarnations else None
    if last and last.cause not in (None, FINISHED) and not last.saved_on_signal:  # no later one redoes its unsaved steps
        saved = max([e["step"] for e in events if e["kind"] == event_ledger.SAVE and e.get("inc") == last.id], default=last.restored_step or 0)
        pieces = [part for p in pieces for part in (_split(p, saved) if p.lane == last.lane and p.category == PRODUCTIVE else [p])]
    seconds = {name: 0.0 for name in CATEGORIES}
    for piece in pieces:
        seconds[piece.category] += piece.seconds
    wall = sum(seconds.values())
    failures = sum(1 for inc in incarnations
                   if inc.cause not in (None, FINISHED, event_ledger.USER_ERROR) and not inc.saved_on_signal) + \
        sum(1 for inc in incarnations[:-1] if inc.cause is None)
    running = wall - seconds["queue"] - seconds["down"]
    nodes = max((inc.nodes for inc in incarnations), default=1)
    saves = [float(e["seconds"]) for e in events if e["kind"] == event_ledger.SAVE and e.get("ok", True) and "seconds" in e]
    background = [float(e["seconds"]) for e in events if e["kind"] == event_ledger.SAVE_BACKGROUND and "seconds" in e]
    restarts = [_restart_cost(pieces, inc.lane) for inc in incarnations[1:]] or \
               [_restart_cost(pieces, inc.lane) for inc in incarnations[:1]]
    trained_steps = sum(max(0, (inc.last_step or 0) - (inc.restored_step or 0)) for inc in incarnations)
    trained_s = seconds[PRODUCTIVE] + seconds[LOST]
    step_time = trained_s / trained_steps if trained_steps else None
    steps_lost = 0
    for before, after in zip(incarnations, incarnations[1:]):
        if before.last_step is not None:
            steps_lost += max(0, before.last_step - (after.restored_step or 0))
        # Steps completed after the incarnation's last step window: the lost time after it in whole steps, fewer
        # than a window holds (that time also holds the failure's detection and teardown).
        unseen = sum(p.seconds for p in pieces if p.lane == before.lane and p.category == LOST and p.step_to is None)
        steps_lost += min(int(unseen / step_time), before.window_steps - 1) if step_time else 0
    warnings = [float(e["warning_s"]) for e in events if e["kind"] == event_ledger.SUBMIT and e.get("warning_s") is not None]
    return Report(
        wall_s=wall, seconds=seconds, goodput=seconds[PRODUCTIVE] / wall if wall > 0 else 0.0,
        incarnations=incarnations, failures=failures, running_s=running,
        mtbf_s=running / failures if failures else None, nodes=nodes,
        save_cost_s=sum(saves) / len(saves) if saves else None,
        restart_cost_s=sum(restarts) / len(restarts) if restarts else None,
        steps_lost=steps_lost, step_time_s=step_time, warning_s=warnings[-1] if warnings else None,
        interval_s=seconds[PRODUCTIVE] / len(saves) if saves else None,
        save_background_s=sum(background) / len(background) if background else None, pieces=pieces,
    )


def _restart_cost(pieces: list[Piece], lane: int) -> float:
    """What one start cost before it trained: its queue wait (after the first), startup and restore."""
    return sum(p.seconds for p in pieces if p.lane == lane and p.category in ("queue", "startup", "restore")
               and not (lane == 0 and p.category == "queue"))


# ----- the interval ---------------------------------------------------------------------------------------------

def young_interval(save_cost_s: float, mtbf_s: float) -> float:
    """Young (1974): the interval between saves that minimises lost time to first order, sqrt(2CM)."""
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def expected_efficiency(interval_s: float, save_cost_s: float, restart_cost_s: float, mtbf_s: float) -> float:
    """The expected fraction of wall time that is useful work when saving every `interval_s` of work:
    Daly's exact expected time to finish one interval plus its save, with failures (exponential, mean M)
    striking during work, saves and restarts alike."""
    x = (interval_s + save_cost_s) / mtbf_s
    if x > 50 or restart_cost_s / mtbf_s > 50:
        return 0.0
    return interval_s / (mtbf_s * math.exp(restart_cost_s / mtbf_s) * math.expm1(x))


def availability_optimal_interval(save_cost_s: float, restart_cost_s: float, mtbf_s: float,
                                  detection_s: float = 0.0) -> float:
    """The interval that maximises expected_efficiency (golden-section search on log T), never shorter than
    the time it takes to notice a failure."""
    lo, hi = math.log(max(save_cost_s, 1e-3) * 1e-2), math.log(max(mtbf_s, 1.0) * 10)
    ratio = (math.sqrt(5) - 1) / 2
    score = lambda log_t: expected_efficiency(math.exp(log_t), save_cost_s, restart_cost_s, mtbf_s)  # noqa: E731
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    for _ in range(100):
        if score(a) > score(b):
            hi, b = b, a
            a = hi - ratio * (hi - lo)
        else:
            lo, a = a, b
            b = lo + ratio * (hi - lo)
    return max(math.exp((lo + hi) / 2), detection_s)


def ettr(nodes_factor: float, interval_s: float, save_cost_s: float, restart_cost_s: float,
         mtbf_s: float) -> float:
    """Meta's first-order effective training time ratio at `nodes_factor` times the job's nodes: each failure
    costs the restart plus half an interval recomputed, each interval a blocking save; failures scale with nodes."""
    rate = nodes_factor / mtbf_s
    return max(0.0, 1.0 - save_cost_s / interval_s - rate * (restart_cost_s + interval_s / 2.0))


def estimate_mtbf(running_s: float, failures: int, nodes: int, history: tuple[float, int] = (0.0, 0),
                  prior_node_mtbf_s: float = PRIOR_NODE_MTBF_S) -> tuple[float, str]:
    """The job's MTBF and where it came from: measured once this job or the cluster's earlier ones (`history`:
    their node-seconds running and failures) saw a failure (at least a second: failures before any running time
    leave no rate to divide by), else the prior per-node rate over the job's nodes (never below the
    failure-free time already seen)."""
    past_node_s, past_failures = history
    if failures + past_failures:
        earlier = f", {past_failures} in {past_node_s / 3600:.2g} node-hours of earlier jobs" if past_node_s else ""
        return (max(1.0, (running_s + past_node_s / max(1, nodes)) / (failures + past_failures)),
                f"measured: {failures} failure(s) in {running_s:.0f} s running{earlier}")
    prior = prior_node_mtbf_s / max(1, nodes)
    return max(prior, running_s), f"prior: {prior_node_mtbf_s / 86400:.0f} node-days per failure over {nodes} node(s)"


@dataclass
class CheckpointInterval:
    """A chosen checkpoint interval and every input it came from (what the log line and the ledger show)."""

    interval_s: float
    optimal_s: float
    save_cost_s: float
    restart_cost_s: float
    mtbf_s: float
    mtbf_source: str
    clamp: str

    def describe(self) -> str:
        return (f"checkpoint every {self.interval_s:.1f} s (optimal {self.optimal_s:.1f} s{self.clamp}; save "
                f"{self.save_cost_s:.2f} s, restart {self.restart_cost_s:.1f} s, MTBF {self.mtbf_s:.0f} s "
                f"[{self.mtbf_source}])")


def choose_interval(save_cost_s: float, restart_cost_s: float, mtbf_s: float, mtbf_source: str,
                    overhead_cap: float = DEFAULT_OVERHEAD_CAP, warning_s: float | None = None) -> CheckpointInterval:
    """The availability-optimal interval, kept long enough that blocking saves take at most `overhead_cap`
    of the time. Preemptions announced `warning_s` ahead are saved for on their signal and are no failures
    (analyse does not count them); a save longer than that warning could not finish, which the clamp names."""
    optimal = availability_optimal_interval(save_cost_s, restart_cost_s, mtbf_s)
    floor = save_cost_s / overhead_cap if overhead_cap > 0 else 0.0
    interval, clamp = optimal, ""
    if interval < floor:
        interval, clamp = floor, f", raised to keep saves under {overhead_cap:.0%} of the time"
    if warning_s is not None and save_cost_s > warning_s:
        clamp += f"; a save takes longer than the {warning_s:.0f} s preemption warning"
    return CheckpointInterval(interval, optimal, save_cost_s, restart_cost_s, mtbf_s, mtbf_source, clamp)


def plan_interval(step_time_s: float, save_cost_s: float | None, restart_cost_s: float | None, running_s: float,
                  failures: int, nodes: int, overhead_cap: float = DEFAULT_OVERHEAD_CAP,
                  history: tuple[float, int] = (0.0, 0), warning_s: float | None = None) -> tuple[float, str, dict]:
    """save_strategy auto: the interval in seconds, the sentence that explains it, and its inputs.

    Until a save was measured the first one comes after as much training as a start costs (R; one step when
    even that is unknown), so a failure before it loses at most that much again; that save's time is then C.
    """
    restart = restart_cost_s or step_time_s
    if save_cost_s is None:
        return restart, f"first checkpoint after {restart:.1f} s, what a start costs (no save measured yet)", \
            {"interval_s": restart, "restart_cost_s": restart}
    mtbf, source = estimate_mtbf(running_s, failures, nodes, history)
    cadence = choose_interval(save_cost_s, restart, mtbf, source, overhead_cap, warning_s)
    return cadence.interval_s, cadence.describe(), vars(cadence)


def what_if(report: Report, interval_s: float, factors=(1, 10, 100)) -> dict[int, float]:
    """ETTR at each multiple of the job's nodes under its measured (or prior) per-node failure rate."""
    mtbf, _ = estimate_mtbf(report.running_s, report.failures, report.nodes)
    return {f: ettr(f, interval_s, report.save_cost_s or 0.0, report.restart_cost_s or 0.0, mtbf) for f in factors}
