#!/usr/bin/env bash
# Entrypoint of both images (docker/Dockerfile.cpu, docker/Dockerfile.gpu): builds the
# `vllm serve` command line from environment variables and execs it (vLLM replaces this
# shell, so it receives the container's SIGTERM directly).
#
#   MODEL              model path or Hugging Face id (required; each image sets a default)
#   KVSPARSE_METHOD    none | zipvl (default zipvl). With `none` NO plugin flag is passed, so
#                      the command is plain `vllm serve` (works even where the plugin's
#                      platform is inactive and --kv-sparsity would be an unknown flag).
#   KVSPARSE_CONFIG    JSON object for --kv-sparsity-config (optional; ignored with `none`)
#   HOST, PORT         bind address and port (default 0.0.0.0, 8000)
#   SERVED_MODEL_NAME  --served-model-name (optional; it is the `model_name` metric label)
#   VLLM_DEFAULT_ARGS  the image's own defaults (e.g. the CPU image's bounded KV cache)
#   EXTRA_ARGS         more `vllm serve` flags, split like a shell would (quotes work, nothing
#                      is expanded or executed): EXTRA_ARGS='--max-num-seqs 8 --limit-mm-per-prompt
#                      "{\"image\": 2}"'
#   KVSPARSE_DRY_RUN=1 print the command (shell-quoted, one line) instead of running it
#
# Container arguments: flags (`docker run IMAGE --max-num-seqs 8`) are appended after
# EXTRA_ARGS; anything else (`docker run IMAGE bash`) is executed instead of the server.
set -euo pipefail

die() { echo "kvsparse-entrypoint: error: $*" >&2; exit 2; }

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi

# Shell-like splitting without eval: Python's shlex (both images have python3).
split_args() {  # $1 = variable name; prints the words NUL-terminated
  python3 -c '
import os, shlex, sys
name = sys.argv[1]
try:
    words = shlex.split(os.environ.get(name, ""))
except ValueError as e:
    sys.exit(f"kvsparse-entrypoint: error: {name} cannot be split: {e}")
sys.stdout.write("".join(w + "\0" for w in words))' "$1"
}

MODEL=${MODEL:-}
METHOD=${KVSPARSE_METHOD:-zipvl}
CONFIG=${KVSPARSE_CONFIG:-}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}

[ -n "$MODEL" ] || die "MODEL is empty; set it to a model path or Hugging Face id"
case "$METHOD" in
  none|zipvl) ;;
  *) die "KVSPARSE_METHOD='$METHOD' is invalid; valid values are none, zipvl" ;;
esac
case "$PORT" in
  ''|*[!0-9]*) die "PORT='$PORT' is invalid; valid values are integers 1-65535" ;;
esac
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] \
  || die "PORT='$PORT' is invalid; valid values are integers 1-65535"

cmd=(vllm serve "$MODEL" --host "$HOST" --port "$PORT")
[ -z "${SERVED_MODEL_NAME:-}" ] || cmd+=(--served-model-name "$SERVED_MODEL_NAME")
if [ "$METHOD" != none ]; then
  cmd+=(--kv-sparsity "$METHOD")
  [ -z "$CONFIG" ] || cmd+=(--kv-sparsity-config "$CONFIG")
elif [ -n "$CONFIG" ]; then
  echo "kvsparse-entrypoint: KVSPARSE_CONFIG is ignored because KVSPARSE_METHOD=none" >&2
fi

for var in VLLM_DEFAULT_ARGS EXTRA_ARGS; do
  split_args "$var" >/dev/null || exit 2   # unbalanced quotes: one line, exit 2
  mapfile -t -d '' more < <(split_args "$var")
  cmd+=(${more[@]+"${more[@]}"})
done
cmd+=("$@")

if [ "${KVSPARSE_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
echo "kvsparse-entrypoint: $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
