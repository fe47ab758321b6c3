"""Node ledger and quarantine, torch-free: what went wrong on which host, and which hosts the next
submission keeps out.

One append-only JSON-lines file per cluster profile (LLAUNCH_HOME/ledger/PROFILE.jsonl): an event is
appended and flushed to disk by whoever saw it (the watchdog's hang culprit, a doctor failure, a straggler,
an ECC/XID error, the rank that failed first) and never rewritten; old events stop counting, they are not
removed. The policy reads the whole file: a host is quarantined after `hard_events` hard or `soft_events`
soft events within `window_s`, and the exclude list for the next submission holds at most as many hosts as
the partition can spare beyond the nodes the job needs, the worst first (most hard events, then most
soft, then the most recent).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from launcher.env import node_ledger_dir
from launcher.files import read_records
from launcher.observe.event_ledger import LARGEST

# Each kind of evidence and how much it says about the host: hard = the host is very likely bad by itself.
SEVERITY = {"hang": "hard", "xid": "hard", "doctor": "hard", "straggler": "soft", "rank_failed": "soft"}


@dataclass(frozen=True)
class NodeEvent:
    host: str
    kind: str  # a key of SEVERITY
    time: float = field(default_factory=time.time)
    job_id: str = ""
    detail: str = ""

    @classmethod
    def from_record(cls, record) -> "NodeEvent":
        """A ledger line's event, or ValueError saying what is wrong with it: an event without its time would
        be dated now at every read, and its host quarantined forever."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        for name in ("host", "kind", "time"):
            if name not in record:
                raise ValueError(f"no {name!r}")
        for name in ("host", "kind", "job_id", "detail"):
            if not isinstance(record.get(name, ""), str):
                raise ValueError(f"{name!r} is {record[name]!r}, not text")
        if record["kind"] not in SEVERITY:
            raise ValueError(f"kind {record['kind']!r} is not one of {', '.join(SEVERITY)}")
        value = record["time"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= LARGEST:
            raise ValueError(f"'time' is {value!r}, not a time in seconds since the epoch")
        return cls(**record)

    @property
    def hard(self) -> bool:
        return SEVERITY[self.kind] == "hard"


@dataclass
class QuarantinePolicy:
    window_s: float = 7 * 24 * 3600.0  # events older than this no longer count
    hard_events: int = 1
    soft_events: int = 2


class NodeLedger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_profile(cls, profile_name: str) -> "NodeLedger":
        return cls(node_ledger_dir() / f"{profile_name}.jsonl")

    def append(self, event: NodeEvent) -> None:
        """One line, written in one call and synced: concurrent writers on other nodes never interleave. The
        ledger is advice for the next submission: one that cannot be written (a directory, a full disk) is
        warned about, and the job that saw the event goes on."""
        if event.kind not in SEVERITY:
            raise ValueError(f"unknown node event kind {event.kind!r}")
        try:
            self._write((json.dumps(asdict(event), sort_keys=True) + "\n").encode())
        except OSError as err:
            print(f"warning: could not record {event.kind} on {event.host} in the node ledger {self.path} "
                  f"({err.strerror or err}); move it away or free space so the next submission can use it.",
                  file=sys.stderr, flush=True)

    def _write(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer died mid-line: start a new one
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> list[NodeEvent]:
        """Every event; a damaged line (cut short by a crash, not JSON, a field of the wrong type, no time) or
        one of a kind this version does not know is skipped with a warning (launcher.files.read_records).
        LaunchError when the ledger is not a regular file or cannot be read."""
        return read_records(self.path, NodeEvent.from_record)


def quarantined(events: list[NodeEvent], policy: QuarantinePolicy, now: float | None = None) -> list[str]:
    """Hosts over the policy's limits within its window, the worst first."""
    now = time.time() if now is None else now
    tally: dict[str, list] = {}
    for event in events:
        if now - event.time <= policy.window_s:
            hard, soft, latest = tally.get(event.host, (0, 0, 0.0))
            tally[event.host] = (hard + event.hard, soft + (not event.hard), max(latest, event.time))
    bad = [host for host, (hard, soft, _) in tally.items()
           if hard >= policy.hard_events or soft >= policy.soft_events]
    return sorted(bad, key=lambda host: (-tally[host][0], -tally[host][1], -tally[host][2], host))


def exclude_for_next_submission(events: list[NodeEvent], policy: QuarantinePolicy, partition_nodes: list[str],
                                nodes_needed: int, now: float | None = None) -> list[str]:
    """The hosts to keep out of the next attempt: quarantined hosts of the partition, never so many that
    fewer than `nodes_needed` remain."""
    spare = max(0, len(partition_nodes) - nodes_needed)
    in_partition = set(partition_nodes)
    return [host for host in quarantined(events, policy, now) if host in in_partition][:spare]
