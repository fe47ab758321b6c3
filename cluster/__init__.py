"""Where jobs go: SLURM submission through submitit, the requeue policy, job state and logs, cluster profiles,
and the real local two-node cluster (cluster/local.py) that tests, CI and the demo run on."""
