"""The doctor's one torch process: a tiny gloo all-reduce over every node, and pairwise ones when it fails.

Run as `python -m cluster.doctor.allreduce ADDRESS PORT NODE NODES ARRIVAL_S TIMEOUT_S FAILED` (one per node,
rank = node index), so that the launcher-side doctor never imports torch. FAILED (0/1) says whether this node
failed a check already; the sum tells every node how many did (`nodes_failed`), so that no node starts torchrun
when another will not. It prints one JSON line: ok, seconds, error, and the nodes that did not arrive within
ARRIVAL_S (`absent_peers`); after a failed all-reduce, for the first node the peers whose pair with it failed
(`failed_peers`), for the others whether their own pair with the first node failed (`self_failed`).

Nodes reach this step seconds apart (each node's checks before it take their own time, and so does importing
torch), so arrival has its own, longer wait: TIMEOUT_S then times the collective alone, and a slow node is
named as late instead of failing the all-reduce. The store is a TCPStore on the rendezvous port.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _reduce(store, prefix: str, rank: int, size: int, timeout: timedelta, failed: int = 0) -> int:
    """All-reduce (1, failed) over the group; the number of nodes that failed a check."""
    group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, timeout)
    tensor = torch.tensor([1.0, float(failed)])
    group.allreduce([tensor]).wait(timeout)
    if tensor[0].item() != size:
        raise RuntimeError(f"sum {tensor[0].item()} instead of {size}")
    return int(tensor[1].item())


def _arrived(store, node: int, nodes: int, arrival: timedelta) -> list[int]:
    """Mark this node arrived and wait for the others; the nodes still absent after `arrival`."""
    store.set(f"arrived/{node}", "1")
    try:
        store.wait([f"arrived/{j}" for j in range(nodes)], arrival)
        return []
    except Exception:  # a timeout: which keys are missing says which nodes
        return [j for j in range(nodes) if not store.check([f"arrived/{j}"])]


def run(address: str, port: int, node: int, nodes: int, arrival_s: float, timeout_s: float, failed: int = 0) -> dict:
    arrival, timeout = timedelta(seconds=arrival_s), timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(address, port, nodes, is_master=node == 0, timeout=arrival, wait_for_workers=False)
    except Exception as err:  # the store is the rendezvous: without it no pair can be tried either
        return {"ok": False, "error": f"store at {address}:{port}: {str(err).splitlines()[0]}", "self_failed": True}
    absent = _arrived(store, node, nodes, arrival)
    if absent:
        return {"ok": False, "error": f"not arrived in {arrival_s:.0f} s", "absent_peers": absent}
    start = time.monotonic()
    try:
        nodes_failed = _reduce(store, "all", node, nodes, timeout, failed)
        return {"ok": True, "seconds": time.monotonic() - start, "nodes_failed": nodes_failed}
    except Exception as err:
        error = str(err).splitlines()[0] if str(err) else err.__class__.__name__
    result: dict = {"ok": False, "error": error}
    pair_timeout = timedelta(seconds=max(2.0, timeout_s / 2))
    if node == 0:
        result["failed_peers"] = []
        for peer in range(1, nodes):
            try:
                _reduce(store, f"pair-{peer}", 0, 2, pair_timeout)
            except Exception:
                result["failed_peers"].append(peer)
    else:
        try:
            _reduce(store, f"pair-{node}", 1, 2, pair_timeout)
            result["self_failed"] = False
        except Exception:
            result["self_failed"] = True
    return result


if __name__ == "__main__":
    address, port, node, nodes, arrival_s, timeout_s, failed = sys.argv[1:8]
    print(json.dumps(run(address, int(port), int(node), int(nodes), float(arrival_s), float(timeout_s), int(failed))),
          flush=True)
    os._exit(0)  # the store and group destructors wait for their peers' sockets, for seconds; the answer is out
