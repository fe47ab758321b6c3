"""`llaunch cluster up|down|status`: the real SLURM cluster on this machine (tests, CI, the demo), two nodes
unless `up --nodes N` says otherwise."""

from __future__ import annotations

import argparse

from launcher.env import DEFAULT_SLURM_DIR, SLURM_CONF, SLURM_DIR
from launcher.knobs import CLUSTER, add_knob_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="start, stop or show the local two-node SLURM cluster")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--state-dir", default=None,
                   help=f"where slurm.conf, state and logs live (default ${SLURM_DIR.name} or {DEFAULT_SLURM_DIR})")
    add_knob_flags(p, CLUSTER, titles={"hardware": "the local cluster (default: the nodes running, else 2)"})
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cluster.local import LocalCluster

    from launcher.errors import LaunchError

    cluster = LocalCluster(state_dir=args.state_dir) if args.state_dir else LocalCluster()
    if args.nodes is not None and (args.action != "up" or args.nodes < 1):
        raise LaunchError(f"--nodes {args.nodes} sizes the cluster `llaunch cluster up` starts; give a positive "
                          f"number with `up` only.")
    cluster.nodes = args.nodes or len(cluster.running_nodes()) or cluster.nodes
    if args.action == "up":
        started = cluster.up()
        print(("started" if started else "already running") + f": local SLURM cluster, {cluster.nodes} nodes "
              f"({', '.join(cluster.node_names)}), partition {cluster.partition}, state in {cluster.state_dir}")
        print(cluster.sinfo().rstrip())
        print(f"\nFor sinfo/squeue/sbatch in your shell:  export {SLURM_CONF.name}={cluster.conf_path}")
        return 0
    if args.action == "down":
        stopped = cluster.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "the local cluster was not running")
        return 0
    if not cluster.is_running():
        print(f"the local cluster is not running (state dir {cluster.state_dir}); start it with `llaunch cluster up`.")
        return 1
    print(f"running: state in {cluster.state_dir}; export {SLURM_CONF.name}={cluster.conf_path}")
    print(cluster.sinfo().rstrip())
    return 0
