#!/usr/bin/env bash
# Cloud TPU VM slice (v4, v5p, ...): copy this repository to every worker, install it, and run the same
# `python -m beitv2_jax.main` on all workers (`gcloud compute tpus tpu-vm ssh --worker=all`), streaming the output.
#
#   launch/tpu_pod.sh --tpu my-v4-64 --zone us-central2-b --project my-project [--create --accelerator-type v4-64] \
#       --config configs/beitv2_base_pt1k_1600e.py --workdir /mnt/shared/runs/base \
#       -- --config.dtype=bfloat16 --config.tokenizer.checkpoint=/mnt/shared/tok --config.data.data_dir=/mnt/shared/tfds
#
# Each worker learns its process id and the coordinator (worker 0) from the TPU VM metadata server, as
# jax.distributed does on Cloud TPU, and passes them to beitv2_jax.main explicitly.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] --config FILE --workdir DIR
                         [options] [-- MAIN_FLAGS...]

Steps (each printed before it runs):
  1. [--create] gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE --version=RUNTIME [--spot]
  2. git archive of REF (default HEAD) -> scp to every worker -> unpack, venv, `pip install -e . jax[tpu]`
     (skipped with --skip-setup)
  3. gcloud compute tpus tpu-vm ssh NAME --worker=all --command='... python -m beitv2_jax.main
       --config=FILE --workdir=DIR --coordinator_address=<worker 0>:PORT --num_processes=<workers>
       --process_id=<this worker> MAIN_FLAGS' (skipped with --setup-only); output streamed here and kept
     on each worker in LOG_DIR/<run>-worker<id>.log

Options:
  --tpu NAME              TPU VM name (default: $TPU_NAME)                                      (required)
  --zone ZONE             zone, e.g. us-central2-b (v4), us-east5-a (v5p) (default: $ZONE)      (required)
  --project PROJECT       project (default: $PROJECT_ID, else gcloud's configured project)
  --create                create the TPU VM first (needs --accelerator-type)
  --accelerator-type T    e.g. v4-32, v4-64, v5p-64 (with --create)
  --version V             TPU VM runtime (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5 for v5p)
  --spot                  create a Spot TPU VM (preemptible: rerun this command to resume)
  --config FILE           config file of this repository, e.g. configs/beitv2_base_pt1k_1600e.py   (required)
  --workdir DIR           run directory every worker reaches at the same path: gs://BUCKET/... or a
                          shared mount (NFS/Filestore); checkpoints are written by all workers (required)
  --ref REF               git commit/branch to ship (default: HEAD; uncommitted changes are not shipped)
  --remote-dir DIR        checkout on the workers (default: $HOME/beitv2_jax; $HOME expands remotely)
  --venv DIR              virtual environment on the workers (default: $HOME/beitv2_venv)
  --log-dir DIR           per-worker logs on the workers (default: $HOME/beitv2_logs)
  --port PORT             coordinator port (default: 8476)
  --skip-setup            do not copy/install (the workers already have this version)
  --setup-only            copy and install, do not run
  --log FILE              also append the streamed output to FILE here
  --dry-run               print the exact commands and run nothing
  -h, --help              this help
Anything after `--`, and any --config.KEY=VALUE argument, is passed to beitv2_jax.main.
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

# Shell-quote one word so that a printed command line can be pasted back into bash.
q() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
cmd_line() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT_ID:-}
CREATE=0 ACCEL="" VERSION="" SPOT=0 CONFIG="" WORKDIR="" REF=HEAD PORT=8476
REMOTE_DIR='$HOME/beitv2_jax' VENV='$HOME/beitv2_venv' LOG_DIR='$HOME/beitv2_logs'
SETUP=1 RUN=1 LOG="" DRY_RUN=0
OVERRIDES=()
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while (($#)); do
  case $1 in
    --tpu) need "$@"; TPU=$2; shift 2 ;;
    --tpu=*) TPU=${1#*=}; shift ;;
    --zone) need "$@"; ZONE=$2; shift 2 ;;
    --zone=*) ZONE=${1#*=}; shift ;;
    --project) need "$@"; PROJECT=$2; shift 2 ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --create) CREATE=1; shift ;;
    --accelerator-type) need "$@"; ACCEL=$2; shift 2 ;;
    --accelerator-type=*) ACCEL=${1#*=}; shift ;;
    --version) need "$@"; VERSION=$2; shift 2 ;;
    --version=*) VERSION=${1#*=}; shift ;;
    --spot) SPOT=1; shift ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --ref) need "$@"; REF=$2; shift 2 ;;
    --ref=*) REF=${1#*=}; shift ;;
    --remote-dir) need "$@"; REMOTE_DIR=$2; shift 2 ;;
    --remote-dir=*) REMOTE_DIR=${1#*=}; shift ;;
    --venv) need "$@"; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#*=}; shift ;;
    --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
    --log-dir=*) LOG_DIR=${1#*=}; shift ;;
    --port) need "$@"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --skip-setup) SETUP=0; shift ;;
    --setup-only) RUN=0; shift ;;
    --log) need "$@"; LOG=$2; shift 2 ;;
    --log=*) LOG=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift  # beitv2_jax.main flags; a --dry-run among them is still ours (main.py has no such flag)
        for arg in "$@"; do
          if [[ $arg == --dry-run ]]; then DRY_RUN=1; else OVERRIDES+=("$arg"); fi
        done
        break ;;
    *) die "unknown argument '$1' (flags of beitv2_jax.main go after --; see --help)" ;;
  esac
done
[[ -n $TPU ]] || die "--tpu is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
((SETUP || RUN)) || die "--skip-setup with --setup-only leaves nothing to do"
if ((CREATE)); then
  [[ -n $ACCEL ]] || die "--create needs --accelerator-type (e.g. v4-64, v5p-64)"
  if [[ -z $VERSION ]]; then
    case $ACCEL in
      v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default --version for accelerator type '$ACCEL'; pass --version" ;;
    esac
  fi
fi
if ((RUN)); then
  [[ -n $CONFIG ]] || die "--config is required (e.g. --config configs/beitv2_base_pt1k_1600e.py)"
  [[ -n $WORKDIR ]] || die "--workdir is required (a path every worker mounts, e.g. /mnt/shared/runs/base)"
  [[ $WORKDIR == /* || $WORKDIR == gs://* ]] || die "--workdir must be gs://... or an absolute path on the workers, got '$WORKDIR'"
  # The workers get a copy of the repository, so the config must be one of its files (path relative to it).
  config_file=${CONFIG%%:*}
  if [[ $config_file == "$REPO"/* ]]; then CONFIG=${CONFIG#"$REPO"/}; config_file=${config_file#"$REPO"/}; fi
  [[ $config_file != /* ]] || die "--config must be a file of this repository (the workers get a copy of it)"
  [[ -f $REPO/$config_file ]] || die "config file not found in the repository: $config_file"
fi

GCLOUD_WHERE=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_WHERE+=("--project=$PROJECT")
TARBALL=${TMPDIR:-/tmp}/beitv2_jax-src.tar.gz
REMOTE_TARBALL=beitv2_jax-src.tar.gz  # in the workers' home directories
RUN_NAME=$(basename "${WORKDIR:-run}")
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes

CREATE_CMD=(gcloud compute tpus tpu-vm create "$TPU" "${GCLOUD_WHERE[@]}" "--accelerator-type=$ACCEL"
            "--version=$VERSION")
((SPOT)) && CREATE_CMD+=(--spot)
ARCHIVE_CMD=(git -C "$REPO" archive --format=tar.gz "--output=$TARBALL" "$REF")
SCP_CMD=(gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:$REMOTE_TARBALL" --worker=all "${GCLOUD_WHERE[@]}")
# Runs on every worker: unpack, create the venv (installing python3-venv if the image lacks it), install.
SETUP_REMOTE="set -e; mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && cd $REMOTE_DIR"
SETUP_REMOTE+=" && { test -x $VENV/bin/python || python3 -m venv $VENV || { sudo apt-get -qq update"
SETUP_REMOTE+=" && sudo apt-get -qq install -y python3-venv && python3 -m venv $VENV; }; }"
SETUP_REMOTE+=" && $VENV/bin/pip install -q -U pip"
SETUP_REMOTE+=" && $VENV/bin/pip install -q -e . \"jax[tpu]\" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
SETUP_CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_WHERE[@]}" "--command=$SETUP_REMOTE")
# Runs on every worker: process id = the worker number, coordinator = worker 0, process count = number of
# workers, all from the metadata server (worker-network-endpoints lists "name:id:ip" or host names, worker 0 first).
overrides=""
for w in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do overrides+=" $(q "$w")"; done
RUN_REMOTE="set -o pipefail; cd $REMOTE_DIR"
RUN_REMOTE+=" && ID=\$(curl -sf -H \"Metadata-Flavor: Google\" $MD/agent-worker-number)"
RUN_REMOTE+=" && EP=\$(curl -sf -H \"Metadata-Flavor: Google\" $MD/worker-network-endpoints)"
RUN_REMOTE+=" && IFS=, read -ra WORKERS <<< \"\$EP\" && COORDINATOR=\${WORKERS[0]##*:} && mkdir -p $LOG_DIR"
RUN_REMOTE+=" && $VENV/bin/python -m beitv2_jax.main $(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")"
RUN_REMOTE+=" --coordinator_address=\$COORDINATOR:$PORT --num_processes=\${#WORKERS[@]} --process_id=\$ID$overrides"
RUN_REMOTE+=" 2>&1 | tee -a $LOG_DIR/$(q "$RUN_NAME")-worker\$ID.log"
RUN_CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_WHERE[@]}" "--command=$RUN_REMOTE")
TEE=""
[[ -z $LOG ]] || TEE=" 2>&1 | tee -a $(q "$LOG")"

if ((DRY_RUN)); then
  echo "# launch/tpu_pod.sh --dry-run: the commands below would run, in this order (nothing was run)"
  ((CREATE)) && cmd_line "${CREATE_CMD[@]}" && echo
  if ((SETUP)); then
    cmd_line "${ARCHIVE_CMD[@]}"; echo
    cmd_line "${SCP_CMD[@]}"; echo
    cmd_line "${SETUP_CMD[@]}"; echo
  fi
  if ((RUN)); then echo "$(cmd_line "${RUN_CMD[@]}")$TEE"; fi
  exit 0
fi

run() { echo "+ $(cmd_line "$@")" >&2; "$@"; }
command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI)"
((CREATE)) && run "${CREATE_CMD[@]}"
if ((SETUP)); then
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    echo "tpu_pod.sh: warning: uncommitted changes are not shipped (git archive $REF)" >&2
  fi
  run "${ARCHIVE_CMD[@]}"
  run "${SCP_CMD[@]}"
  run "${SETUP_CMD[@]}"
fi
if ((RUN)); then
  echo "+ $(cmd_line "${RUN_CMD[@]}")$TEE" >&2
  if [[ -n $LOG ]]; then "${RUN_CMD[@]}" 2>&1 | tee -a "$LOG"; else "${RUN_CMD[@]}"; fi
fi
