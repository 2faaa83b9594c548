#!/usr/bin/env bash
# Student training on several nodes without a scheduler: DeepSpeed's own multi-node launcher reads a hostfile
# and starts one process per GPU on every host through pdsh (passwordless ssh from this host to every host).
#
#   printf 'node1 slots=8\nnode2 slots=8\n' > hostfile
#   HOSTFILE=hostfile OUT_DIR=/shared/runs/llama1b_aug bash configs/cluster/train_hostfile.sh \
#       configs/paper/llama1b_aug.yaml store.path=s3://bucket/kava/llama1b_aug
#
# The first host of the hostfile is the rendezvous (MASTER_ADDR); every host needs the repo and .venv at this
# same path, pdsh installed, and OUT_DIR on a filesystem they all mount at the same path (docs/CLUSTER.md).
# Environment variables to forward to every rank go into ./.deepspeed_env (one NAME=value a line), e.g.
# NCCL_SOCKET_IFNAME, HF_HOME, AWS_* for an s3:// store.
set -euo pipefail

CONFIG=${1:?usage: train_hostfile.sh CONFIG [overrides...]}
shift
HOSTFILE=${HOSTFILE:-hostfile}
OUT_DIR=${OUT_DIR:?set OUT_DIR to a directory every host sees at the same path}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
cd "$(dirname "$0")/../.."
RESUME=()
[[ -f "$OUT_DIR/checkpoints/latest" ]] && RESUME=(--resume)

exec .venv/bin/deepspeed --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" jobs/train.py --config "$CONFIG" "train.out_dir=$OUT_DIR" "$@" ${RESUME[@]+"${RESUME[@]}"}
