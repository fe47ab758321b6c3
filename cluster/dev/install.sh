#!/usr/bin/env bash
# Install what the local SLURM cluster needs (slurm-wlm, munge) on Debian/Ubuntu; idempotent and quiet.
# Runs as root (CI containers) or through sudo. Starting the cluster is `llaunch cluster up`, not this script.
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/tmp/llaunch-apt.log 2>&1 \
    || { cat /tmp/llaunch-apt.log >&2; exit 1; }
echo "installed: $(slurmctld -V) and $(munged -V 2>&1 | head -n1)"
