#!/usr/bin/env bash
# Train a recipe on the nodes of a DeepSpeed hostfile (lines "HOST slots=N"), over pdsh/ssh.
#
#   launch/hostfile.sh HOSTFILE RECIPE [key=value ...]
#
# Rank 0 (first host) runs the data audit gate before training starts; the run directory
# (output_dir) must be on storage every node sees. parallel.nproc must equal the total slots.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE RECIPE [key=value ...]" >&2
  exit 2
fi
hostfile=$1 recipe=$2
shift 2
[ -f "$hostfile" ] || { echo "$0: hostfile $hostfile does not exist" >&2; exit 2; }
master=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  --module toolkit.worker --recipe "$recipe" "$@"
