#!/usr/bin/env bash
# One node of a multi-node run: every node runs this same command; only NODE_RANK differs.
#
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 \
#       scripts/launch_multinode.sh yamls/pruning/llama2_7b_to_2.7b.yaml key=value ...
#
# It runs `composer --world_size NNODES*GPUS_PER_NODE --node_rank NODE_RANK -n GPUS_PER_NODE
# --master_addr MASTER_ADDR --master_port MASTER_PORT train.py <yaml> <key=value ...>`.
# Under Slurm (scripts/slurm_train.sbatch) NNODES, NODE_RANK and MASTER_ADDR default to the job's
# SLURM_NNODES, SLURM_NODEID and first host, GPUS_PER_NODE to SLURM_GPUS_ON_NODE; elsewhere, and for
# GPUS_PER_NODE without Slurm, set them. MASTER_PORT defaults to 29500. COMPOSER overrides the launcher
# (default: `composer` on PATH). variables.save_folder must be on storage every node mounts.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: NNODES=N NODE_RANK=R GPUS_PER_NODE=G MASTER_ADDR=HOST [MASTER_PORT=29500] $0 RUN.yaml [key=value ...]" >&2
    exit 2
fi

NNODES=${NNODES:-${SLURM_NNODES:-}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z ${MASTER_ADDR:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-29500}

missing=()
for name in NNODES NODE_RANK GPUS_PER_NODE MASTER_ADDR; do
    [[ -n ${!name:-} ]] || missing+=("$name")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "$0: set ${missing[*]} (outside Slurm every node needs NNODES, NODE_RANK, GPUS_PER_NODE and MASTER_ADDR)" >&2
    exit 2
fi
for name in NNODES NODE_RANK GPUS_PER_NODE MASTER_PORT; do
    if ! [[ ${!name} =~ ^[0-9]+$ ]]; then
        echo "$0: $name=${!name} is not a whole number" >&2
        exit 2
    fi
done
if (( NODE_RANK >= NNODES )); then
    echo "$0: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES (ranks count from 0)" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${COMPOSER:-composer}" \
    --world_size $((NNODES * GPUS_PER_NODE)) --node_rank "$NODE_RANK" -n "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO/train.py" "$@"
