"""How the nodes see each other during a check: each serves its facts over TCP, the others fetch them.

No shared file is needed (shared storage is one of the things checked), and the same connection measures
the clock: the server answers with its time, the client takes half the round trip off (NTP's estimate).
A node's server lives until every peer has fetched from it, so no node leaves before the slowest asked.
"""

from __future__ import annotations

import json
import socket
import threading
import time

DOCTOR_PORT_OFFSET = 1  # node i serves on rendezvous port + 1 + i: distinct even when nodes share a host
IO_TIMEOUT_S = 5.0
RETRY_S = 0.2


def doctor_port(rdzv_port: int, node: int) -> int:
    return rdzv_port + DOCTOR_PORT_OFFSET + node


class FactsServer:
    """Answers every `NODE\\n` request with this node's facts and time as one JSON line; remembers who asked."""

    def __init__(self, facts: dict, port: int) -> None:
        self.facts = facts
        self.asked: set[int] = set()
        self._changed = threading.Condition()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("", port))
        self._sock.listen(64)
        self._sock.settimeout(RETRY_S)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                try:
                    asker = int(conn.makefile().readline().strip() or -1)
                    conn.sendall((json.dumps({**self.facts, "time": time.time()}) + "\n").encode())
                except (OSError, ValueError):
                    continue
            with self._changed:
                self.asked.add(asker)
                self._changed.notify_all()

    def wait_asked(self, peers: set[int], timeout_s: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: peers <= self.asked, timeout=timeout_s)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self._thread.join(timeout=2 * RETRY_S)


def fetch(address: str, port: int, asker: int, timeout_s: float) -> tuple[dict, float]:
    """The facts a node serves and the offset of its clock from ours, retrying until it is up or timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=IO_TIMEOUT_S) as conn:
                sent = time.time()
                conn.sendall(f"{asker}\n".encode())
                line = conn.makefile().readline()
                received = time.time()
            facts = json.loads(line)
            return facts, facts["time"] - (sent + received) / 2
        except (OSError, ValueError, KeyError) as err:
            if time.monotonic() >= deadline:
                raise OSError(f"no answer from {address}:{port} in {timeout_s:.0f} s: {err}") from None
            time.sleep(RETRY_S)


def reaches(address: str, port: int, timeout_s: float = IO_TIMEOUT_S) -> bool:
    """One TCP connection to a peer's facts server at one of its interface addresses."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False
