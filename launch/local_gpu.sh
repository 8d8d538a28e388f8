#!/usr/bin/env bash
# One workstation, one process that drives every visible GPU (or the ones named with --gpus).
#
#   launch/local_gpu.sh --config configs/beitv2_base_pt1k_1600e.py --workdir /data/runs/base \
#       [--gpus 0,1,2,3] [--log FILE] [--dry-run] [-- --config.key=value ...]
#
# The batch is split over all GPUs of the process (config.mesh, default data=-1); no coordinator is needed.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_gpu.sh --config FILE --workdir DIR [options] [-- MAIN_FLAGS...]

Runs `python -m beitv2_jax.main` once on this machine; JAX uses all visible GPUs in one process.

Options:
  --config FILE     config file (configs/<name>.py, optionally FILE:arg)            (required)
  --workdir DIR     checkpoints, metrics and outputs of the run                       (required)
  --gpus LIST       CUDA_VISIBLE_DEVICES for the run, e.g. 0,1,2,3 (default: all visible GPUs)
  --python PY       Python interpreter (default: $PYTHON or `python`)
  --log FILE        also append the run's output to FILE
  --dry-run         print the exact commands and run nothing
  -h, --help        this help
Anything after `--`, and any --config.KEY=VALUE argument, is passed to beitv2_jax.main, e.g.
  -- --config.dtype=bfloat16 --config.mesh.fsdp=8 --config.tokenizer.checkpoint=/data/tok
EOF
}

die() { echo "local_gpu.sh: error: $*" >&2; exit 2; }

# Shell-quote one word so that a printed command line can be pasted back into bash.
q() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
cmd_line() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG="" WORKDIR="" GPUS="" PY=${PYTHON:-python} LOG="" DRY_RUN=0
OVERRIDES=()
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while (($#)); do
  case $1 in
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --gpus) need "$@"; GPUS=$2; shift 2 ;;
    --gpus=*) GPUS=${1#*=}; shift ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
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
[[ -n $CONFIG ]] || die "--config is required (e.g. --config configs/beitv2_base_pt1k_1600e.py)"
[[ -n $WORKDIR ]] || die "--workdir is required"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,2,3, got '$GPUS'"

# The command runs in the repository root: a config path relative to it stays as given; one relative to the
# current directory becomes absolute, as does a relative --workdir.
config_file=${CONFIG%%:*}
if [[ $config_file != /* && -f $REPO/$config_file ]]; then :
elif [[ -f $config_file ]]; then
  [[ $config_file == /* ]] || CONFIG=$PWD/$CONFIG
else die "config file not found: $config_file"; fi
[[ $WORKDIR == /* || $WORKDIR == *://* ]] || WORKDIR=$PWD/$WORKDIR  # gs://... stays a URI

MAIN=("$PY" -m beitv2_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
ENVS=()
[[ -z $GPUS ]] || ENVS=(env "CUDA_VISIBLE_DEVICES=$GPUS")
RUN=(${ENVS[@]+"${ENVS[@]}"} "${MAIN[@]}")
TEE=""
[[ -z $LOG ]] || TEE=" 2>&1 | tee -a $(q "$LOG")"

if ((DRY_RUN)); then
  echo "# launch/local_gpu.sh --dry-run: the commands below would run (nothing was run)"
  echo "# one process on ${GPUS:+GPUs }${GPUS:-all visible GPUs}; the batch is split by config.mesh"
  echo "cd $(q "$REPO")"
  echo "$(cmd_line "${RUN[@]}")$TEE"
  exit 0
fi

cd "$REPO"
echo "+ $(cmd_line "${RUN[@]}")$TEE" >&2
if [[ -n $LOG ]]; then
  "${RUN[@]}" 2>&1 | tee -a "$LOG"
else
  exec "${RUN[@]}"
fi
