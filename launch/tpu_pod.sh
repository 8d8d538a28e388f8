#!/usr/bin/env bash
# Cloud TPU VM slice (v4, v5p, ...): copy this repository to every worker, install it with a pinned jax[tpu], and
# start the same `python -m beitv2_jax.main` on all workers, detached (setsid + nohup: a dropped ssh does not stop
# it). With --watch the script stays and keeps a Spot slice running: a preempted slice is deleted, recreated,
# set up and started again; the run resumes from the newest checkpoint in its (gs://) workdir.
#
#   launch/tpu_pod.sh --tpu my-v5p --zone us-east5-a --project my-project --create --accelerator-type v5p-128 \
#       --spot --watch --config configs/beitv2_base_pt1k_1600e.py --workdir gs://my-bucket/runs/base \
#       -- --config.dtype=bfloat16 --config.tokenizer.checkpoint=gs://my-bucket/tok \
#       --config.data.data_dir=gs://my-bucket/tfds
#
# Each worker learns its process id and the coordinator (worker 0) from the TPU VM metadata server, as
# jax.distributed does on Cloud TPU, and passes them to beitv2_jax.main explicitly.
set -euo pipefail

# The jax version the project is tested with (it satisfies requirements.txt); jax[tpu]==V pulls the matching libtpu.
JAX_VERSION_DEFAULT=0.10.2
# libtpu's XLA flags (LIBTPU_INIT_ARGS), see docs/scaling.md "Operations": run the data-parallel gradient all-reduce
# and the fsdp all-gathers asynchronously, fused with and overlapped by compute.
LIBTPU_ARGS_DEFAULT="--xla_tpu_enable_data_parallel_all_reduce_opt=true"
LIBTPU_ARGS_DEFAULT+=" --xla_tpu_data_parallel_opt_different_sized_ops=true"
LIBTPU_ARGS_DEFAULT+=" --xla_tpu_enable_async_collective_fusion=true"
LIBTPU_ARGS_DEFAULT+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
LIBTPU_ARGS_DEFAULT+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
LIBTPU_ARGS_DEFAULT+=" --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] --config FILE --workdir DIR
                         [options] [-- MAIN_FLAGS...]

Steps (each printed before it runs):
  1. [--create] gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE --version=RUNTIME [--spot]
     (--queued: gcloud compute tpus queued-resources create NAME-qr --node-id=NAME ... instead)
  2. git archive of REF (default HEAD) -> scp to every worker -> unpack, venv,
     `pip install -e . jax[tpu]==JAX_VERSION` (skipped with --skip-setup)
  3. on every worker: stop the previous run of this workdir (SIGTERM: it saves a checkpoint; SIGKILL after
     --stop-wait s), kill processes still holding the TPU, remove /tmp/libtpu_lockfile, then start
     `python -m beitv2_jax.main --config=FILE --workdir=DIR --coordinator_address=<worker 0>:PORT
       --num_processes=<workers> --process_id=<this worker> MAIN_FLAGS` detached (setsid nohup) with
     LIBTPU_INIT_ARGS; output in LOG_DIR/<run>-worker<id>.log, its pid in LOG_DIR/<run>.pid and, when it
     ends, done / preempted / killed:CODE / failed:CODE in LOG_DIR/<run>.status (skipped with --setup-only)
  4. [--watch] every --poll s: the slice's state and worker 0's run status. A PREEMPTED / TERMINATED /
     missing slice (a SUSPENDED / FAILED queued resource) is deleted, recreated, set up and started again; a
     run that stopped on a READY slice (preempted, killed, none) is started again; a done run ends the watch
     (exit 0), a failed one too (exit 1). Every start resumes from the newest checkpoint in the workdir.

Options:
  --tpu NAME              TPU VM name (default: $TPU_NAME)                                      (required)
  --zone ZONE             zone, e.g. us-central2-b (v4), us-east5-a (v5p) (default: $ZONE)      (required)
  --project PROJECT       project (default: $PROJECT_ID, else gcloud's configured project)
  --create                create the TPU VM first (needs --accelerator-type)
  --accelerator-type T    e.g. v4-32, v4-64, v5p-128 (with --create, and --watch to recreate)
  --version V             TPU VM runtime (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5 for v5p)
  --spot                  Spot capacity (preemptible: add --watch to recreate and resume)
  --queued                create through a queued resource NAME-qr (waits for capacity)
  --config FILE           config file of this repository, e.g. configs/beitv2_base_pt1k_1600e.py   (required)
  --workdir DIR           run directory every worker reaches: gs://BUCKET/PATH, or an absolute path on a
                          shared mount (NFS/Filestore); checkpoints are written by all workers    (required)
  --ref REF               git commit/branch to ship (default: HEAD; uncommitted changes are not shipped)
  --jax-version V         jax[tpu] version to install (default: the tested JAX_VERSION_DEFAULT)
  --libtpu-args STR       LIBTPU_INIT_ARGS of the run (default: the recommended flags above; "" = none)
  --remote-dir DIR        checkout on the workers (default: $HOME/beitv2_jax; $HOME expands remotely)
  --venv DIR              virtual environment on the workers (default: $HOME/beitv2_venv)
  --log-dir DIR           logs, pid and status files on the workers (default: $HOME/beitv2_logs)
  --port PORT             coordinator port (default: 8476)
  --stop-wait S           seconds a previous run gets to save its checkpoint after SIGTERM (default: 120)
  --skip-setup            do not copy/install (the workers already have this version)
  --setup-only            copy and install, do not run
  --watch                 then watch the slice and the run every --poll s; recreate / restart as above
  --attach                with --watch: start nothing now, only watch (and restart when needed)
  --poll S                seconds between watch checks (default: 300)
  --max-restarts N        with --watch: give up (exit 1) after N restarts or recreations (default: 100)
  --log FILE              also append this script's messages (commands run, watch events) to FILE
  --dry-run               print the exact commands (the watch loop's too) and run nothing
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
CREATE=0 ACCEL="" VERSION="" SPOT=0 QUEUED=0 CONFIG="" WORKDIR="" REF=HEAD PORT=8476
JAX_VERSION=$JAX_VERSION_DEFAULT LIBTPU_ARGS=$LIBTPU_ARGS_DEFAULT STOP_WAIT=120
REMOTE_DIR='$HOME/beitv2_jax' VENV='$HOME/beitv2_venv' LOG_DIR='$HOME/beitv2_logs'
SETUP=1 RUN=1 WATCH=0 ATTACH=0 POLL=300 MAX_RESTARTS=100 LOG="" DRY_RUN=0
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
    --queued) QUEUED=1; shift ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --workdir) need "$@"; WORKDIR=$2; shift 2 ;;
    --workdir=*) WORKDIR=${1#*=}; shift ;;
    --ref) need "$@"; REF=$2; shift 2 ;;
    --ref=*) REF=${1#*=}; shift ;;
    --jax-version) need "$@"; JAX_VERSION=$2; shift 2 ;;
    --jax-version=*) JAX_VERSION=${1#*=}; shift ;;
    --libtpu-args) [[ $# -ge 2 ]] || die "--libtpu-args needs a value"; LIBTPU_ARGS=$2; shift 2 ;;
    --libtpu-args=*) LIBTPU_ARGS=${1#*=}; shift ;;
    --remote-dir) need "$@"; REMOTE_DIR=$2; shift 2 ;;
    --remote-dir=*) REMOTE_DIR=${1#*=}; shift ;;
    --venv) need "$@"; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#*=}; shift ;;
    --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
    --log-dir=*) LOG_DIR=${1#*=}; shift ;;
    --port) need "$@"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --stop-wait) need "$@"; STOP_WAIT=$2; shift 2 ;;
    --stop-wait=*) STOP_WAIT=${1#*=}; shift ;;
    --skip-setup) SETUP=0; shift ;;
    --setup-only) RUN=0; shift ;;
    --watch) WATCH=1; shift ;;
    --attach) ATTACH=1; shift ;;
    --poll) need "$@"; POLL=$2; shift 2 ;;
    --poll=*) POLL=${1#*=}; shift ;;
    --max-restarts) need "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
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
for pair in "port:$PORT" "stop-wait:$STOP_WAIT" "poll:$POLL" "max-restarts:$MAX_RESTARTS"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "--${pair%%:*} must be a number, got '${pair#*:}'"
done
[[ $JAX_VERSION =~ ^[0-9]+(\.[0-9]+)*$ ]] || die "--jax-version must look like 0.10.2, got '$JAX_VERSION'"
((SETUP || RUN)) || die "--skip-setup with --setup-only leaves nothing to do"
((!WATCH || RUN)) || die "--watch needs a run (drop --setup-only)"
((!ATTACH || WATCH)) || die "--attach only goes with --watch"
if ((CREATE || WATCH)); then
  if [[ -z $ACCEL ]]; then
    ((CREATE)) && die "--create needs --accelerator-type (e.g. v4-64, v5p-128)"
    die "--watch needs --accelerator-type (to recreate a preempted slice)"
  fi
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
  [[ -n $WORKDIR ]] || die "--workdir is required (gs://BUCKET/PATH or a path every worker mounts)"
  [[ $WORKDIR == /* || $WORKDIR == gs://?* ]] ||
    die "--workdir must be gs://BUCKET/PATH or an absolute path on the workers, got '$WORKDIR'"
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
QR_NAME=$TPU-qr
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes
PID_FILE="$LOG_DIR/$(q "$RUN_NAME").pid"
STATUS_FILE="$LOG_DIR/$(q "$RUN_NAME").status"

if ((QUEUED)); then
  CREATE_CMD=(gcloud compute tpus queued-resources create "$QR_NAME" "--node-id=$TPU" "${GCLOUD_WHERE[@]}"
              "--accelerator-type=$ACCEL" "--runtime-version=$VERSION")
  DELETE_CMD=(gcloud compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_WHERE[@]}" --force --quiet)
  STATE_CMD=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_WHERE[@]}"
             "--format=value(state.state)")
else
  CREATE_CMD=(gcloud compute tpus tpu-vm create "$TPU" "${GCLOUD_WHERE[@]}" "--accelerator-type=$ACCEL"
              "--version=$VERSION")
  DELETE_CMD=(gcloud compute tpus tpu-vm delete "$TPU" "${GCLOUD_WHERE[@]}" --quiet)
  STATE_CMD=(gcloud compute tpus tpu-vm describe "$TPU" "${GCLOUD_WHERE[@]}" "--format=value(state)")
fi
((SPOT)) && CREATE_CMD+=(--spot)
ARCHIVE_CMD=(git -C "$REPO" archive --format=tar.gz "--output=$TARBALL" "$REF")
SCP_CMD=(gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:$REMOTE_TARBALL" --worker=all "${GCLOUD_WHERE[@]}")
# Runs on every worker: unpack, create the venv (installing python3-venv if the image lacks it), install.
SETUP_REMOTE="set -e; mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && cd $REMOTE_DIR"
SETUP_REMOTE+=" && { test -x $VENV/bin/python || python3 -m venv $VENV || { sudo apt-get -qq update"
SETUP_REMOTE+=" && sudo apt-get -qq install -y python3-venv && python3 -m venv $VENV; }; }"
SETUP_REMOTE+=" && $VENV/bin/pip install -q -U pip"
SETUP_REMOTE+=" && $VENV/bin/pip install -q -e . \"jax[tpu]==$JAX_VERSION\""
SETUP_REMOTE+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
SETUP_CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_WHERE[@]}" "--command=$SETUP_REMOTE")

# Runs on every worker before a start: the previous run of this workdir gets SIGTERM (it saves a checkpoint at the
# next step and exits) and --stop-wait seconds, then SIGKILL; processes still holding the TPU chips (/dev/accel*
# on v4, /dev/vfio/* on v5p) are killed and libtpu's lock file is removed, so that the new run can open the TPU.
STOP_REMOTE="if [ -f $PID_FILE ]; then P=\$(cat $PID_FILE); kill -TERM -- -\$P 2>/dev/null;"
STOP_REMOTE+=" for i in \$(seq $STOP_WAIT); do kill -0 -- -\$P 2>/dev/null || break; sleep 1; done;"
STOP_REMOTE+=" kill -KILL -- -\$P 2>/dev/null; rm -f $PID_FILE; fi;"
STOP_REMOTE+=" H=\$(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr '\\n' ' ');"
STOP_REMOTE+=" [ -z \"\$H\" ] || sudo -n kill -9 \$H 2>/dev/null;"
STOP_REMOTE+=" rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile; true"
# The detached job: the run's output goes to the log; its exit becomes the status (exit 0 after a SIGTERM /
# preemption stop prints "preempted: stopped at step ..." last, see beitv2_jax/main.py).
# The wrapper traps SIGTERM (a stop sends it to the whole process group) so that it outlives the run and records it.
JOB='trap true TERM; log=$1 status=$2; shift 2; "$@" >> "$log" 2>&1; rc=$?'
JOB+='; if [ $rc = 0 ] && tail -n 100 "$log" | grep -q "preempted: stopped at step"; then s=preempted'
JOB+='; elif [ $rc = 0 ]; then s=done; elif [ $rc -ge 128 ]; then s=killed:$rc; else s=failed:$rc; fi'
JOB+='; echo $s > "$status"'
# Runs on every worker: process id = the worker number, coordinator = worker 0, process count = number of
# workers, all from the metadata server (worker-network-endpoints lists "name:id:ip" or host names, worker 0 first).
overrides=""
for w in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do overrides+=" $(q "$w")"; done
RUN_REMOTE="set -o pipefail; cd $REMOTE_DIR"
RUN_REMOTE+=" && ID=\$(curl -sf -H \"Metadata-Flavor: Google\" $MD/agent-worker-number)"
RUN_REMOTE+=" && EP=\$(curl -sf -H \"Metadata-Flavor: Google\" $MD/worker-network-endpoints)"
RUN_REMOTE+=" && IFS=, read -ra WORKERS <<< \"\$EP\" && COORDINATOR=\${WORKERS[0]##*:} && mkdir -p $LOG_DIR"
RUN_REMOTE+=" && { $STOP_REMOTE; } && rm -f $STATUS_FILE"
RUN_REMOTE+=" && export LIBTPU_INIT_ARGS=$(q "$LIBTPU_ARGS")"
RUN_REMOTE+=" && { setsid nohup bash -c $(q "$JOB") beitv2_jax $LOG_DIR/$(q "$RUN_NAME")-worker\$ID.log $STATUS_FILE"
RUN_REMOTE+=" $VENV/bin/python -m beitv2_jax.main $(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")"
RUN_REMOTE+=" --coordinator_address=\$COORDINATOR:$PORT --num_processes=\${#WORKERS[@]} --process_id=\$ID$overrides"
RUN_REMOTE+=" > /dev/null 2>&1 < /dev/null & echo \$! > $PID_FILE; }"
RUN_CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_WHERE[@]}" "--command=$RUN_REMOTE")
# Worker 0's run: running (its pid is alive), else the status file (done, preempted, killed:N, failed:N) or none.
STATUS_REMOTE="if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; then echo running;"
STATUS_REMOTE+=" elif [ -f $STATUS_FILE ]; then cat $STATUS_FILE; else echo none; fi"
STATUS_CMD=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=0 "${GCLOUD_WHERE[@]}" "--command=$STATUS_REMOTE")
TAIL_HINT="gcloud compute tpus tpu-vm ssh $(q "$TPU") --worker=0 $(cmd_line "${GCLOUD_WHERE[@]}")"
TAIL_HINT+=" $(q "--command=tail -F $LOG_DIR/$RUN_NAME-worker0.log")"

if ((DRY_RUN)); then
  echo "# launch/tpu_pod.sh --dry-run: the commands below would run, in this order (nothing was run)"
  ((CREATE)) && cmd_line "${CREATE_CMD[@]}" && echo
  if ((SETUP)); then
    cmd_line "${ARCHIVE_CMD[@]}"; echo
    cmd_line "${SCP_CMD[@]}"; echo
    cmd_line "${SETUP_CMD[@]}"; echo
  fi
  if ((RUN && !ATTACH)); then cmd_line "${RUN_CMD[@]}"; echo; fi
  ((RUN)) && echo "# follow worker 0: $TAIL_HINT"
  if ((WATCH)); then
    echo "# watch: every $POLL s (at most $MAX_RESTARTS restarts): the slice's state, then worker 0's run status"
    cmd_line "${STATE_CMD[@]}"; echo
    cmd_line "${STATUS_CMD[@]}"; echo
    echo "# state PREEMPTED, TERMINATED, STOPPED, SUSPENDED, FAILED or not found: delete, recreate, set up, start"
    echo "# (the run resumes from the newest checkpoint in $WORKDIR)"
    cmd_line "${DELETE_CMD[@]}"; echo
    cmd_line "${CREATE_CMD[@]}"; echo
    cmd_line "${ARCHIVE_CMD[@]}"; echo
    cmd_line "${SCP_CMD[@]}"; echo
    cmd_line "${SETUP_CMD[@]}"; echo
    cmd_line "${RUN_CMD[@]}"; echo
    echo "# state READY/ACTIVE and status preempted, killed:N or none: start again (resumes)"
    cmd_line "${RUN_CMD[@]}"; echo
    echo "# status done: exit 0; failed:N: exit 1; running, or the slice CREATING/PROVISIONING/...: wait"
  fi
  exit 0
fi

say() { echo "$*" >&2; [[ -z $LOG ]] || echo "$(date -u +%FT%TZ) $*" >> "$LOG"; }
run() { say "+ $(cmd_line "$@")"; "$@"; }
command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI)"
do_setup() {
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    say "tpu_pod.sh: warning: uncommitted changes are not shipped (git archive $REF)"
  fi
  run "${ARCHIVE_CMD[@]}" && run "${SCP_CMD[@]}" && run "${SETUP_CMD[@]}"
}
do_start() { run "${RUN_CMD[@]}" && say "started; follow worker 0: $TAIL_HINT"; }
slice_state() { "${STATE_CMD[@]}" 2>/dev/null | tail -n 1 || true; }
run_status() { local out; out=$("${STATUS_CMD[@]}" 2>/dev/null | tail -n 1) || out=""; echo "${out:-unreachable}"; }

COMING_UP="CREATING STARTING RESTARTING REPAIRING ACCEPTED WAITING_FOR_RESOURCES PROVISIONING"
# Wait while the slice is being created (sets $state to the first other state).
wait_while_coming_up() { while state=$(slice_state); [[ " $COMING_UP " == *" $state "* ]]; do sleep "$POLL"; done; }

# The watch survives failing gcloud calls (a slice preempted mid-command, a network error): the next poll retries;
# a recreated slice is set up before its first start.
watch_loop() {
  local restarts=0 state status need_setup=0
  while true; do
    state=$(slice_state)
    case ${state:-NOT_FOUND} in
      READY|ACTIVE)
        status=$(run_status)
        case $status in
          running|unreachable) ;;
          done) say "watch: the run is done"; return 0 ;;
          failed:*) say "watch: the run failed ($status); not restarting (see the worker logs)"; return 1 ;;
          *) ((restarts++ < MAX_RESTARTS)) || { say "watch: $MAX_RESTARTS restarts reached"; return 1; }
             say "watch: slice $state, run $status: starting it again"
             if ((need_setup)); then do_setup && need_setup=0 || { say "watch: setup failed"; sleep "$POLL"; continue; }; fi
             do_start || say "watch: start failed; the next poll retries" ;;
        esac ;;
      PREEMPTED|TERMINATED|STOPPED|SUSPENDED|FAILED|NOT_FOUND)
        ((restarts++ < MAX_RESTARTS)) || { say "watch: $MAX_RESTARTS restarts reached"; return 1; }
        say "watch: slice ${state:-not found}: recreating it"
        [[ -z $state ]] || run "${DELETE_CMD[@]}" || true
        run "${CREATE_CMD[@]}" || { say "watch: create failed; retrying after $POLL s"; sleep "$POLL"; continue; }
        need_setup=1
        wait_while_coming_up
        [[ $state == READY || $state == ACTIVE ]] || continue  # anything else: the next poll handles it
        do_setup && need_setup=0 || { say "watch: setup failed; the next poll retries"; sleep "$POLL"; continue; }
        do_start || say "watch: start failed; the next poll retries" ;;
      *) ;;  # CREATING, STARTING, RESTARTING, REPAIRING, WAITING_FOR_RESOURCES, PROVISIONING, ...: wait
    esac
    sleep "$POLL"
  done
}

((CREATE)) && run "${CREATE_CMD[@]}"
if ((CREATE && QUEUED)); then
  say "waiting for the queued resource $QR_NAME to become ACTIVE"
  wait_while_coming_up
fi
((SETUP)) && do_setup
if ((RUN && !ATTACH)); then
  if ((WATCH)); then do_start || say "start failed; the watch retries"; else do_start; fi
fi
if ((WATCH)); then watch_loop; fi
