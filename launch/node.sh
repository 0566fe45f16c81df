#!/usr/bin/env bash
# Train a recipe with one DeepSpeed launcher per node (no ssh between the hosts): run this on
# every host, with its own node rank, the same recipe and the same node-0 address.
#
#   launch/node.sh NODE_RANK NODES MASTER_ADDR RECIPE [key=value ...] [--dry-run]
#
# Node 0 runs the data audit gate; every other node waits for it, checks that it sees the same
# recipe and data, and only then do all of them start. parallel.nproc counts the ranks of all nodes.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 NODE_RANK NODES MASTER_ADDR RECIPE [key=value ...] [--dry-run]" >&2
  exit 2
fi
node_rank=$1 nodes=$2 master=$3 recipe=$4
shift 4
exec dstk train "$recipe" "parallel.nodes=$nodes" "parallel.master_addr=$master" --node-rank "$node_rank" "$@"
