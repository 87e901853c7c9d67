#!/usr/bin/env bash
# Train pixelgen on a Cloud TPU VM slice (one or many hosts) with gcloud.
#
# Usage:
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator-type TYPE] [OPTIONS] [--] TRAIN_ARGS...
#
# Steps (each is a gcloud command, printed before it runs):
#   1. reuse the TPU VM slice NAME if it is READY, else create it
#      (gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type TYPE --version V)
#   2. on every worker (--worker=all): make a Python venv ~/pixelgen_venv (uv, Python 3.12),
#      put the source in ~/pixelgen_src/pixelgen and pip install it with its [tpu] extra (the
#      jax and libtpu pair tested together); the source is
#      either --repo (pip install -e 'git+URL@REF') or a tarball of this checkout (tracked and
#      untracked files that git does not ignore, uncommitted edits included) copied with
#      gcloud compute tpus tpu-vm scp --worker=all
#   3. on every worker (--worker=all), from ~/pixelgen_src/pixelgen (so configs/... resolve):
#        python -m pixelgen.train --distributed TRAIN_ARGS...
#      --distributed makes each host call jax.distributed.initialize(), which finds the slice
#      topology by itself.
# Use a gs:// workdir (--workdir gs://BUCKET/run): it is passed through unchanged and Orbax
# checkpoints, metrics and tfds data read and write gs:// paths directly, so all hosts share
# one workdir and a run survives the slice. A local workdir would be per host.
# The training runs in the foreground of the ssh session: start this from tmux/screen for
# long runs (rerunning the same command resumes from the latest checkpoint in the workdir).
# If the ssh session dies, training may go on on the workers; stop it with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command 'pkill -f pixelgen.train'
#
# Options (everything else, and everything after "--", goes to pixelgen.train):
#   --name NAME               TPU VM name (default $TPU_NAME, else "pixelgen")
#   --zone ZONE               zone, e.g. us-east5-a (default $TPU_ZONE; required)
#   --accelerator-type TYPE   e.g. v5p-64, v4-32, v5litepod-16, v6e-8; needed only to create
#   --version V               TPU VM runtime, e.g. v2-alpha-tpuv5; default from TYPE:
#                             v5p: v2-alpha-tpuv5, v5litepod/v5e: v2-alpha-tpuv5-lite,
#                             v6e: v2-alpha-tpuv6e, v2/v3/v4: tpu-ubuntu2204-base
#   --project PROJECT         GCP project (default: gcloud's configured project)
#   --spot | --preemptible    create a Spot / preemptible slice
#   --repo URL[@REF]          install from git (e.g. https://github.com/ORG/pixelgen@main)
#                             instead of copying this checkout
#   --data-dir DIR            TFDS_DATA_DIR on the workers, e.g. gs://BUCKET/tensorflow_datasets
#   --env NAME=VALUE          extra environment for training on the workers (repeatable)
#   --python-version X.Y      Python of the workers' venv (default 3.12)
#   --skip-install            reuse what an earlier run installed on the workers
#   --dry-run                 print the commands and exit; run nothing (gcloud is not called)
#   -h, --help                this text
#
# Example:
#   launch/tpu_pod.sh --name pg --zone us-east5-a --accelerator-type v5p-64 --spot \
#     --data-dir gs://my-bucket/tfds -- --config configs/igpt_shapes.py --workdir gs://my-bucket/runs/igpt
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail$/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  printf 'tpu_pod.sh: %s\n' "$*" >&2
  exit 2
}

# shellcheck source=quoting.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"

name=${TPU_NAME:-pixelgen}
zone=${TPU_ZONE:-}
accelerator_type=''
version=''
project=''
provisioning=()
repo=''
data_dir=''
worker_env=()
python_version=3.12
skip_install=0
dry_run=0
train_args=()

need_value() {
  [[ $2 -ge 2 ]] || die "$1 needs a value (see -h)"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --name | --zone | --accelerator-type | --version | --project | --repo | --data-dir | --env | --python-version)
      need_value "$1" "$#"
      opt=$1 value=$2
      shift 2
      ;;
    --name=* | --zone=* | --accelerator-type=* | --version=* | --project=* | --repo=* | --data-dir=* | --env=* | --python-version=*)
      opt=${1%%=*} value=${1#*=}
      shift
      ;;
    --spot | --preemptible)
      provisioning=("$1")
      shift
      continue
      ;;
    --skip-install)
      skip_install=1
      shift
      continue
      ;;
    --dry-run)
      dry_run=1
      shift
      continue
      ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    *)
      train_args+=("$1")
      shift
      continue
      ;;
  esac
  case $opt in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --accelerator-type) accelerator_type=$value ;;
    --version) version=$value ;;
    --project) project=$value ;;
    --repo) repo=$value ;;
    --data-dir) data_dir=$value ;;
    --env)
      [[ $value =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got '$value'"
      worker_env+=("$value")
      ;;
    --python-version) python_version=$value ;;
  esac
done

[[ -n $name ]] || die '--name is empty'
[[ -n $zone ]] || die 'pass --zone ZONE (or set TPU_ZONE), e.g. --zone us-east5-a'
[[ ${#train_args[@]} -gt 0 ]] || die 'no arguments for pixelgen.train (e.g. -- --config configs/igpt_shapes.py --workdir gs://BUCKET/run); see -h'

if [[ -n $accelerator_type && -z $version ]]; then
  case $accelerator_type in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    *) die "no default runtime for --accelerator-type $accelerator_type: pass --version" ;;
  esac
fi

for ((k = 0; k < ${#train_args[@]}; k++)); do
  case ${train_args[k]} in
    --workdir) workdir=${train_args[k + 1]:-} ;;
    --workdir=*) workdir=${train_args[k]#*=} ;;
  esac
done
if [[ -n ${workdir:-} && $workdir != gs://* ]]; then
  printf 'tpu_pod.sh: warning: --workdir %s is not gs://, so each TPU host writes its own copy; use gs://BUCKET/... on a multi-host slice\n' "$workdir" >&2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n $project ]]; then
  where+=(--project "$project")
fi

# --- what runs on the workers -------------------------------------------------------------
remote_src="\"\$HOME/pixelgen_src/pixelgen\""  # expanded on the worker
remote_venv="\"\$HOME/pixelgen_venv\""
remote_tarball=pixelgen_src.tar.gz  # relative to the worker's home directory
if [[ -n $repo ]]; then
  pip_url=$repo
  [[ $pip_url == git+* ]] || pip_url="git+$pip_url"
  [[ $pip_url == *'#egg='* ]] || pip_url="$pip_url#egg=pixelgen"
  # pip clones into ~/pixelgen_src/pixelgen (configs/ included); installed below with [tpu].
  get_source="$remote_venv/bin/python -m pip install -q --no-deps --src \"\$HOME/pixelgen_src\" --exists-action w -e $(shquote "$pip_url") && "
else
  get_source="rm -rf $remote_src && mkdir -p $remote_src && tar -xzf \"\$HOME/$remote_tarball\" -C $remote_src && "
fi
remote_src_tpu="\"\$HOME/pixelgen_src/pixelgen[tpu]\""  # with the tested jax and libtpu
setup_cmd="set -euo pipefail; export PATH=\"\$HOME/.local/bin:\$PATH\"; "
setup_cmd+="command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
setup_cmd+="[ -x $remote_venv/bin/python ] || uv venv --seed --python $(shquote "$python_version") $remote_venv; "
setup_cmd+="$remote_venv/bin/python -m pip install -q -U pip && $get_source"
setup_cmd+="$remote_venv/bin/python -m pip install -q -e $remote_src_tpu"

run_env=()
if [[ -n $data_dir ]]; then
  run_env+=("TFDS_DATA_DIR=$data_dir")
fi
run_env+=("${worker_env[@]}")
run_cmd="cd $remote_src && . $remote_venv/bin/activate && "
if [[ ${#run_env[@]} -gt 0 ]]; then
  run_cmd+="env $(join_quoted "${run_env[@]}") "
fi
run_cmd+="$(join_quoted python -m pixelgen.train --distributed "${train_args[@]}")"

# --- the gcloud commands ----------------------------------------------------------------------
describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}")
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator_type"
  --version "$version" "${provisioning[@]}")
scp_cmd() {  # scp_cmd LOCAL: sets the array `scp`
  scp=("${gcloud_tpu[@]}" scp "$1" "$name:$remote_tarball" "${where[@]}" --worker=all)
}
setup=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$setup_cmd")
run=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$run_cmd")

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ $dry_run -eq 1 ]]; then
  printf '# TPU VM %s in %s: reuse it if READY, else create it\n' "$name" "$zone"
  if [[ -n $accelerator_type ]]; then
    printf '%s >/dev/null 2>&1 || %s\n' "$(join_quoted "${describe[@]}")" "$(join_quoted "${create[@]}")"
  else
    printf '# (no --accelerator-type: it must exist already)\n'
    printf '%s\n' "$(join_quoted "${describe[@]}")"
  fi
  if [[ $skip_install -eq 0 ]]; then
    if [[ -z $repo ]]; then
      printf '# pack %s (files git does not ignore) into LOCAL_TARBALL and copy it to every worker\n' "$repo_root"
      scp_cmd LOCAL_TARBALL
      printf '%s\n' "$(join_quoted "${scp[@]}")"
    fi
    printf '# install pixelgen[tpu] (the tested jax and libtpu) on every worker\n'
    printf '%s\n' "$(join_quoted "${setup[@]}")"
  fi
  printf '# train on every worker\n'
  printf '%s\n' "$(join_quoted "${run[@]}")"
  exit 0
fi

command -v gcloud >/dev/null || die 'gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)'

say_and_run() {
  printf '+ %s\n' "$(join_quoted "$@")" >&2
  "$@"
}

state=$("${describe[@]}" --format='value(state)' 2>/dev/null) || state=''
case $state in
  READY)
    printf 'tpu_pod.sh: reusing TPU VM %s (READY)\n' "$name" >&2
    ;;
  '')
    [[ -n $accelerator_type ]] || die "TPU VM $name not found in $zone: pass --accelerator-type (e.g. v5p-64) to create it"
    say_and_run "${create[@]}"
    ;;
  *)
    die "TPU VM $name is $state, not READY (a preempted slice must be deleted: $(join_quoted "${gcloud_tpu[@]}" delete "$name" "${where[@]}"))"
    ;;
esac

if [[ $skip_install -eq 0 ]]; then
  if [[ -z $repo ]]; then
    tarball=$(mktemp "${TMPDIR:-/tmp}/pixelgen_src.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -e $f ]]; then
            printf '%s\0' "$f"
          fi
        done | tar --null -T - -czf "$tarball")
    else
      tar -czf "$tarball" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=__pycache__ \
        -C "$repo_root" .
    fi
    scp_cmd "$tarball"
    say_and_run "${scp[@]}"
  fi
  say_and_run "${setup[@]}"
fi
say_and_run "${run[@]}"
