"""`llaunch doctor`: preflight checks that name the node and the check before a multi-node job spends its hours.

`checks` turns what a node measured into ok / warn / FAIL and one sentence (pure, unit-tested); `probes`
measures this node (interfaces, versions, disk, NVML); `exchange` is the small TCP service through which the
nodes see each other's facts and clocks; `allreduce` is the one torch process (a tiny gloo all-reduce, run as
its own process); `node` runs them all on one node and writes its JSON; `faults` are the test hooks.
"""
