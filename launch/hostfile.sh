#!/usr/bin/env bash
# Train a recipe on the nodes of a DeepSpeed hostfile (lines "HOST slots=N"), started from this
# host over pdsh/ssh (or parallel.launcher=openmpi|mvapich|mpich|impi|slurm).
#
#   launch/hostfile.sh HOSTFILE RECIPE [key=value ...] [--dry-run]
#
# dstk runs the data audit gate here, once, before any node starts. The run directory (output_dir)
# must be on storage every node sees; parallel.nodes and parallel.nproc must match the hostfile.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE RECIPE [key=value ...] [--dry-run]" >&2
  exit 2
fi
hostfile=$1 recipe=$2
shift 2
exec dstk train "$recipe" "parallel.hostfile=$hostfile" "$@"
