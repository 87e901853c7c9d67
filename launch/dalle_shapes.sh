#!/usr/bin/env bash
# The DALL·E pipeline on the embedded `shapes` dataset, in one command: train the dVAE,
# encode the dataset into codes, train CLIP and the transformer, evaluate, and write
# WORKDIR/results.json.
#
# Usage:
#   launch/dalle_shapes.sh WORKDIR [--seed N] [--tiny] [--guidance_scales "2 3"]
#                          [--dvae_args "--config.model.encoder_width=32 ..."]
#                          [--clip_args "--config.total_steps=4000 ..."]
#                          [--dalle_args "--config.total_steps=2000 ..."]
#
# Leaves WORKDIR/dvae, WORKDIR/codes, WORKDIR/clip, WORKDIR/dalle (each a pixelgen workdir or
# codes dataset), WORKDIR/results.json (see launch/dalle_shapes_results.py for its keys) and
# WORKDIR/heldout_samples.png (the held-out captions' samples: unreranked, reranked, guided).
# The colour/shape pairs of configs/dalle_shapes.py's HOLDOUT_PHRASES are dropped from the
# training images and captions of all three models, so that reranking by CLIP cannot bring in
# knowledge of the unseen pairs. The transformer trains with loss.caption_dropout=0.1, so
# that it can sample with classifier-free guidance.
#
# Killed at any point, the same command resumes: each training resumes from its last
# checkpoint, a finished stage is skipped (WORKDIR/stages/<stage>.seconds holds its time),
# an interrupted encoding resumes after its last complete chunk, and finished evaluations are
# kept.
#
# Options:
#   --seed N                the seed of every training run and of the evaluation (default 0)
#   --tiny                  the :tiny configs and a few samples: a smoke test of minutes
#   --guidance_scales "S.." classifier-free guidance scales to evaluate (default "2 3")
#   --dvae_args "ARGS"      more arguments for the dVAE's training (config overrides: levers)
#   --clip_args "ARGS"      more arguments for CLIP's training (likewise)
#   --dalle_args "ARGS"     more arguments for the transformer's training (likewise)
#   -h, --help              this text
# Environment: PYTHON (default python) is the interpreter.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail$/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  printf 'dalle_shapes.sh: %s\n' "$*" >&2
  exit 2
}

[[ $# -ge 1 ]] || {
  usage >&2
  exit 2
}
case $1 in
  -h | --help)
    usage
    exit 0
    ;;
  -*) die "the first argument is WORKDIR, got '$1' (see -h)" ;;
esac
workdir=$1
shift
seed=0
tiny=0
scales='2 3'
dvae_args=()
clip_args=()
dalle_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seed)
      [[ $# -ge 2 ]] || die "--seed needs a value"
      seed=$2
      shift 2
      ;;
    --tiny)
      tiny=1
      shift
      ;;
    --guidance_scales)
      [[ $# -ge 2 ]] || die "--guidance_scales needs a value"
      scales=$2
      shift 2
      ;;
    --dvae_args)
      [[ $# -ge 2 ]] || die "--dvae_args needs a value"
      read -r -a dvae_args <<<"$2"
      shift 2
      ;;
    --clip_args)
      [[ $# -ge 2 ]] || die "--clip_args needs a value"
      read -r -a clip_args <<<"$2"
      shift 2
      ;;
    --dalle_args)
      [[ $# -ge 2 ]] || die "--dalle_args needs a value"
      read -r -a dalle_args <<<"$2"
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1' (see -h)" ;;
  esac
done
[[ $seed =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, got '$seed'"

python=${PYTHON:-python}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
holdout=$("$python" -c 'import runpy
print(repr(runpy.run_path("configs/dalle_shapes.py")["HOLDOUT_PHRASES"]))')
holdout_list=$("$python" -c 'import runpy
print(",".join(runpy.run_path("configs/dalle_shapes.py")["HOLDOUT_PHRASES"]))')

variant=''
dalle_sizes=()
if [[ $tiny -eq 1 ]]; then
  variant=':tiny'
  # The tiny dVAE turns 32x32 images into 16x16 codes of 32.
  dalle_sizes=(--config.model.grid_size=16 --config.model.image_vocab_size=32)
fi

mkdir -p "$workdir/stages"

stage() { # stage NAME COMMAND...: runs COMMAND unless the stage finished before
  local name=$1 t0=$SECONDS
  shift
  if [[ -f $workdir/stages/$name.seconds ]]; then
    printf '[dalle_shapes] %s: done before (%ss), skipped\n' "$name" "$(cat "$workdir/stages/$name.seconds")"
    return 0
  fi
  printf '[dalle_shapes] %s: %s\n' "$name" "$*"
  "$@"
  echo $((SECONDS - t0)) >"$workdir/stages/$name.seconds"
}

encode() { # an interrupted encoding resumes after its last complete chunk
  "$python" -m pixelgen.dvae encode --workdir "$workdir/dvae" --dataset shapes \
    --out "$workdir/codes" --exclude_phrases "$holdout_list" "$@"
}

stage dvae "$python" -m pixelgen.train --config "configs/dvae_shapes.py$variant" \
  --workdir "$workdir/dvae" --config.seed="$seed" --config.data.holdout_phrases="$holdout" \
  "${dvae_args[@]}"
num_examples=()
[[ $tiny -eq 1 ]] && num_examples=(--num_examples 400)
stage encode encode "${num_examples[@]}"
stage clip "$python" -m pixelgen.train --config "configs/clip_shapes.py$variant" \
  --workdir "$workdir/clip" --config.seed="$seed" --config.data.holdout_phrases="$holdout" \
  "${clip_args[@]}"
stage dalle "$python" -m pixelgen.train --config "configs/dalle_shapes.py$variant" \
  --workdir "$workdir/dalle" --config.seed="$seed" --config.data.codes_dir="$workdir/codes" \
  --config.dvae_workdir="$workdir/dvae" --config.data.holdout_phrases="$holdout" \
  --config.loss.caption_dropout=0.1 "${dalle_sizes[@]}" "${dalle_args[@]}"
tiny_flag=()
[[ $tiny -eq 1 ]] && tiny_flag=(--tiny)
# shellcheck disable=SC2086  # the scales are words
stage evaluate "$python" launch/dalle_shapes_results.py "$workdir" --seed "$seed" \
  --guidance_scales $scales "${tiny_flag[@]}"
"$python" launch/dalle_shapes_results.py "$workdir" --write_only
