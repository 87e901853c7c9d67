#!/usr/bin/env bash
# Run N pixelgen processes on this machine, joined by jax.distributed (CPU devices).
#
# Usage:
#   launch/local_multiprocess.sh N [--devices-per-process D] [--port P] [--module M] [--dry-run]
#       [--] JOB_ARGS...
#
# Starts N processes, each
#   JAX_NUM_CPU_DEVICES=D JAX_PLATFORMS=cpu python -m M \
#       --coordinator_address localhost:P --num_processes N --process_id i JOB_ARGS...
# M is pixelgen.train by default; pixelgen.evaluate, pixelgen.sample and pixelgen.rerank take
# the same flags (for `pixelgen.dvae encode`, put `encode` first in JOB_ARGS).
# Process 0 prints to this terminal (each line prefixed "[p0] "); process i > 0 of a training
# job writes to WORKDIR/logs/process_<i>.log when JOB_ARGS contain --workdir; other jobs, and
# training without --workdir, write those logs to a temp dir.
# Waits for all; if one fails, the others are stopped and the exit status is non-zero.
# Ctrl-C stops them all. This is how multi-host training is tested on one machine.
#
# Options (before "--"; everything else, and everything after "--", goes to the job):
#   N                          number of processes (first argument)
#   --devices-per-process D    CPU devices per process (JAX_NUM_CPU_DEVICES), default 1
#   --port P                   coordinator port on localhost, default: a free port
#   --module M                 the job's module, default pixelgen.train
#   --dry-run                  print the N commands and exit; start nothing
#   -h, --help                 this text
# Environment: PYTHON (default python) is the interpreter; GRACE_S (default 20) is how long
# stopped processes get to exit after SIGTERM before SIGKILL.
#
# Example:
#   launch/local_multiprocess.sh 2 --config configs/igpt_shapes.py:tiny --workdir /tmp/mp
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail$/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  printf 'local_multiprocess.sh: %s\n' "$*" >&2
  exit 2
}

# shellcheck source=quoting.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case $1 in
  -h | --help)
    usage
    exit 0
    ;;
esac
num_procs=$1
shift
[[ $num_procs =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$num_procs' (see -h)"

devices=1
port=''
module=pixelgen.train
job_args=()
dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --devices-per-process)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      devices=$2
      shift 2
      ;;
    --devices-per-process=*)
      devices=${1#*=}
      shift
      ;;
    --port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      port=$2
      shift 2
      ;;
    --port=*)
      port=${1#*=}
      shift
      ;;
    --module)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      module=$2
      shift 2
      ;;
    --module=*)
      module=${1#*=}
      shift
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    *)
      train_args+=("$1")
      shift
      ;;
  esac
done
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$devices'"

python=${PYTHON:-python}
grace_s=${GRACE_S:-20}

if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])' 2>/dev/null) ||
    port=$((12355 + RANDOM % 1000))
fi
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
coordinator="localhost:$port"

# The workdir (if any) decides where the logs of processes 1..N-1 go.
workdir=''
for ((k = 0; k < ${#train_args[@]}; k++)); do
  case ${train_args[k]} in
    --workdir) workdir=${train_args[k + 1]:-} ;;
    --workdir=*) workdir=${train_args[k]#*=} ;;
  esac
done
if [[ $module == pixelgen.dvae ]]; then  # its subcommand comes before its flags
  job_args=("${train_args[0]:-}")
  train_args=("${train_args[@]:1}")
fi
[[ $module =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module must be a module name, got '$module'"
if [[ -n $workdir && $workdir != *://* && $module == pixelgen.train ]]; then
  log_dir="$workdir/logs"
else
  log_dir="${TMPDIR:-/tmp}/pixelgen_logs.XXXXXX"  # made by mktemp below
fi

commands=()  # one printable command per process
proc_cmd() {  # proc_cmd I: sets the array `cmd` to process I's command
  cmd=(env "JAX_NUM_CPU_DEVICES=$devices" JAX_PLATFORMS=cpu "$python" -m "$module"
    "${job_args[@]}" --coordinator_address "$coordinator" --num_processes "$num_procs" --process_id "$1"
    "${train_args[@]}")
}
for ((i = 0; i < num_procs; i++)); do
  proc_cmd "$i"
  commands+=("$(join_quoted "${cmd[@]:1}")")  # without the leading `env`
done

if [[ $dry_run -eq 1 ]]; then
  printf '# %d process(es) on localhost, coordinator %s, %d CPU device(s) each\n' \
    "$num_procs" "$coordinator" "$devices"
  for ((i = 0; i < num_procs; i++)); do
    if [[ $i -eq 0 ]]; then
      printf '# process 0: output to the terminal, prefixed [p0]\n'
    else
      printf '# process %d: output to %s\n' "$i" "$log_dir/process_$i.log"
    fi
    printf '%s\n' "${commands[i]}"
  done
  exit 0
fi

if [[ $log_dir == *.XXXXXX ]]; then
  log_dir=$(mktemp -d "$log_dir")
else
  mkdir -p "$log_dir"
fi
fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/pixelgen_p0.XXXXXX")
fifo="$fifo_dir/p0"
mkfifo "$fifo"

pids=()        # one per process; each is the leader of its own process group
prefix_pid=''  # the [p0] prefixer

stop_all() {  # SIGTERM every process group still running, SIGKILL after $grace_s seconds
  local pid alive waited=0
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  while :; do
    alive=0
    if command -v ps >/dev/null; then  # a zombie waiting to be reaped does not count
      if ps -A -o pgid=,stat= | awk -v groups=" ${pids[*]} " \
        'index(groups, " " $1 " ") && $2 !~ /^Z/ { found = 1 } END { exit !found }'; then
        alive=1
      fi
    else
      for pid in "${pids[@]}"; do
        if kill -0 -- "-$pid" 2>/dev/null; then
          alive=1
        fi
      done
    fi
    [[ $alive -eq 1 && $waited -lt $((grace_s * 5)) ]] || break
    sleep 0.2
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317  # (called by the trap below)
cleanup() {
  local rc=$?
  trap - EXIT
  trap 'grace_s=0' INT TERM  # a second Ctrl-C: SIGKILL now
  stop_all
  if [[ -n $prefix_pid ]]; then  # let it print what is left, but don't hang on it
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$prefix_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill "$prefix_pid" 2>/dev/null || true
    wait "$prefix_pid" 2>/dev/null || true
  fi
  rm -rf "$fifo_dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

awk '{ print "[p0] " $0; fflush() }' <"$fifo" &
prefix_pid=$!

printf 'local_multiprocess.sh: %d process(es), coordinator %s, %d CPU device(s) each; logs of processes 1.. in %s\n' \
  "$num_procs" "$coordinator" "$devices" "$log_dir" >&2
set -m  # each process gets its own process group, so stopping it also stops its children
for ((i = 0; i < num_procs; i++)); do
  proc_cmd "$i"
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" >"$fifo" 2>&1 </dev/null &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 </dev/null &
  fi
  pids+=("$!")
done
set +m

# Wait for all; on the first failure stop the others.
status=0
running=("${!pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${pids[i]}" || rc=$?
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      printf 'local_multiprocess.sh: process %d exited with status %d; stopping the others\n' "$i" "$rc" >&2
      if [[ $i -gt 0 ]]; then
        printf -- '--- last lines of %s ---\n' "$log_dir/process_$i.log" >&2
        tail -n 20 "$log_dir/process_$i.log" >&2 || true
      fi
      stop_all
    fi
  done
  running=("${still[@]}")
  if [[ ${#running[@]} -gt 0 ]]; then
    sleep 0.2
  fi
done
exit "$status"
