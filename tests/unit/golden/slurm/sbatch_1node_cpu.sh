#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=2
#SBATCH --error=/shared/runs/demo/slurm/%j_0_log.err
#SBATCH --job-name=llaunch-demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/runs/demo/slurm/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=30
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/demo/slurm/%j_%t_log.out --error /shared/runs/demo/slurm/%j_%t_log.err --kill-on-bad-exit=1 /opt/venv/bin/python -u -m submitit.core._submit /shared/runs/demo/slurm


# teardown
llaunch_step_status=$?
[ "$llaunch_step_status" -eq 0 ] || /opt/venv/bin/python -u -m cluster.teardown /shared/runs/demo/slurm "$llaunch_step_status"
exit "$llaunch_step_status"