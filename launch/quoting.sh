# shellcheck shell=bash
# Shared by local_multiprocess.sh and tpu_pod.sh (sourced, not run). slurm_gpu.sbatch keeps
# its own copy: sbatch runs a spooled copy of the script, from which this file is not found.

# Quotes one word for a POSIX shell (only when needed), for printed and remote commands.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces.
join_quoted() {
  local out=() word
  for word in "$@"; do
    out+=("$(shquote "$word")")
  done
  printf '%s' "${out[*]}"
}
