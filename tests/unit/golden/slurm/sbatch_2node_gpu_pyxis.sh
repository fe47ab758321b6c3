#!/bin/bash

# Parameters
#SBATCH --account=proj-42
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=96
#SBATCH --error=/shared/runs/demo/slurm/%j_0_log.err
#SBATCH --gpus-per-node=8
#SBATCH --job-name=llaunch-demo
#SBATCH --mem=800GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/shared/runs/demo/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
export LLAUNCH_CACHE=/shared/cache PYTHONPATH=/opt/llaunch

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/runs/demo/slurm/%j_%t_log.out --error /shared/runs/demo/slurm/%j_%t_log.err --kill-on-bad-exit=1 '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-mounts=/shared/runs/demo:/shared/runs/demo,/opt/llaunch:/opt/llaunch:ro,/shared/cache:/shared/cache,/datasets:/datasets:ro --container-workdir=/workspace python3 -u -m submitit.core._submit /shared/runs/demo/slurm


# teardown
llaunch_step_status=$?
[ "$llaunch_step_status" -eq 0 ] || /opt/venv/bin/python -u -m cluster.teardown /shared/runs/demo/slurm "$llaunch_step_status"
exit "$llaunch_step_status"