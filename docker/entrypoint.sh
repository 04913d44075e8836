#!/usr/bin/env bash
# Entrypoint of both images (docker/Dockerfile.cpu, docker/Dockerfile.gpu): builds the
# `vllm serve` command line from environment variables and the container's arguments, and
# execs it (vLLM replaces this shell, so it receives the container's SIGTERM directly).
#
#   MODEL              model path or Hugging Face id (each image sets a default)
#   KVSPARSE_METHOD    none | zipvl | fastv | snapkv | pyramidkv | streamingllm | vlcache |
#                      aircache | random (default zipvl). With `none` NO plugin flag is passed, so
#                      the command is plain `vllm serve` (works even where the plugin's
#                      platform is inactive and --kv-sparsity would be an unknown flag).
#   KVSPARSE_CONFIG    JSON object for --kv-sparsity-config (optional; ignored with `none`)
#   HOST, PORT         bind address and port (default 0.0.0.0, 8000). The image's HEALTHCHECK
#                      and the Kubernetes probes use PORT, so a different `--port` in the
#                      arguments is refused: set PORT instead.
#   SERVED_MODEL_NAME  --served-model-name (optional; it is the `model_name` metric label)
#   SHUTDOWN_TIMEOUT   --shutdown-timeout: seconds vLLM lets in-flight requests finish after
#                      SIGTERM (vLLM's default, 0, aborts them). Keep it below the container's
#                      stop grace period (Kubernetes terminationGracePeriodSeconds).
#   VLLM_DEFAULT_ARGS  the image's own defaults (e.g. the CPU image's bounded KV cache)
#   EXTRA_ARGS         more `vllm serve` flags, split like a shell would (quotes work, nothing
#                      is expanded or executed): EXTRA_ARGS='--max-num-seqs 8 --limit-mm-per-prompt
#                      "{\"image\": 2}"'. Put an API key in VLLM_API_KEY, not in --api-key here:
#                      vLLM reads VLLM_API_KEY itself and the key stays out of argv and logs.
#   KVSPARSE_DRY_RUN=1 print the command (shell-quoted, one line) instead of running it
#
# Container arguments follow the official vllm/vllm-openai image (ENTRYPOINT vllm serve):
#   IMAGE                               the model in MODEL
#   IMAGE Qwen/Qwen2-VL-2B-Instruct ... a leading model sets the model (replaces MODEL and
#                                       SERVED_MODEL_NAME); the rest are flags
#   IMAGE --model X ...                 --model sets the model the same way
#   IMAGE --max-num-seqs 8              flags are appended after EXTRA_ARGS
#   IMAGE bash | IMAGE /path/to/prog    a first argument that is an executable (on PATH, or a
#                                       path to one) runs instead of the server
# `--model` in EXTRA_ARGS or VLLM_DEFAULT_ARGS also replaces MODEL (container arguments win).
set -euo pipefail

die() { echo "kvsparse-entrypoint: error: $*" >&2; exit 2; }
note() { echo "kvsparse-entrypoint: $*" >&2; }

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && type -P -- "$1" >/dev/null; then
  exec "$@"
fi

# Arbitrary non-root uids (`docker run --user "$(id -u):0"`, OpenShift): a uid missing from
# /etc/passwd gets HOME=/ (not writable) and no user name, which breaks the caches that live
# under $HOME and Python's getpass.getuser() (torch's compile cache). Same fallbacks as the
# upstream vLLM non-root entrypoint.
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then
  HOME="${TMPDIR:-/tmp}/kvsparse-home"
  mkdir -p "$HOME"
  export HOME
fi
[ -n "${USER:-}" ] || export USER=kvsparse
[ -n "${LOGNAME:-}" ] || export LOGNAME="$USER"

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
SERVED=${SERVED_MODEL_NAME:-}
SHUTDOWN=${SHUTDOWN_TIMEOUT:-}

# The methods of `--kv-sparsity` (vllm_kvsparse.config.METHODS; a test keeps them equal).
METHODS="none zipvl fastv snapkv pyramidkv streamingllm vlcache aircache random"
case " $METHODS " in
  *" $METHOD "*) ;;
  *) die "KVSPARSE_METHOD='$METHOD' is invalid; valid values are ${METHODS// /, }" ;;
esac
case "$PORT" in
  ''|*[!0-9]*) die "PORT='$PORT' is invalid; valid values are integers 1-65535" ;;
esac
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] \
  || die "PORT='$PORT' is invalid; valid values are integers 1-65535"
case "$SHUTDOWN" in
  *[!0-9]*) die "SHUTDOWN_TIMEOUT='$SHUTDOWN' is invalid; valid values are integers >= 0 (seconds)" ;;
esac

# take_flags SOURCE WORDS...: copies WORDS into `taken`, minus `--model X` / `--model=X` (which
# set `found_model`) and a `--port` equal to PORT; refuses another --port.
take_flags() {
  local source=$1
  shift
  taken=()
  found_model=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --model|--port)
        [ $# -ge 2 ] || die "$1 in $source needs a value"
        set -- "$1=$2" "${@:3}"
        continue ;;
      --model=*)
        [ -z "$found_model" ] || die "--model is given twice in $source"
        found_model=${1#--model=}
        [ -n "$found_model" ] || die "--model in $source is empty" ;;
      --port=*)
        [ "${1#--port=}" = "$PORT" ] || die "--port ${1#--port=} in $source: set PORT=${1#--port=} instead (the HEALTHCHECK and the Kubernetes probes use PORT)" ;;
      *) taken+=("$1") ;;
    esac
    shift
  done
}

model_from=""
tail_args=()
for var in VLLM_DEFAULT_ARGS EXTRA_ARGS; do
  split_args "$var" >/dev/null || exit 2   # unbalanced quotes: one line, exit 2
  mapfile -t -d '' words < <(split_args "$var")
  take_flags "$var" ${words[@]+"${words[@]}"}
  tail_args+=(${taken[@]+"${taken[@]}"})
  if [ -n "$found_model" ]; then MODEL=$found_model; model_from="--model in $var"; fi
done

positional=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  positional=$1
  shift
fi
take_flags "the container arguments" "$@"
tail_args+=(${taken[@]+"${taken[@]}"})
if [ -n "$positional" ] && [ -n "$found_model" ] && [ "$positional" != "$found_model" ]; then
  die "two models in the container arguments: '$positional' and --model '$found_model'; give one"
fi
if [ -n "${positional:-$found_model}" ]; then
  MODEL=${positional:-$found_model}
  model_from="the container arguments"
fi
[ -z "$model_from" ] || note "model $MODEL from $model_from (replaces MODEL)"
if [ "$model_from" = "the container arguments" ] && [ -n "$SERVED" ]; then
  # The image's SERVED_MODEL_NAME names the image's model, not this one; `vllm serve`
  # names a model after itself unless --served-model-name is among the arguments.
  note "SERVED_MODEL_NAME=$SERVED is not used for it (pass --served-model-name to name it)"
  SERVED=""
fi

[ -n "$MODEL" ] || die "MODEL is empty; set it to a model path or Hugging Face id"

cmd=(vllm serve "$MODEL" --host "$HOST" --port "$PORT")
[ -z "$SERVED" ] || cmd+=(--served-model-name "$SERVED")
[ -z "$SHUTDOWN" ] || cmd+=(--shutdown-timeout "$SHUTDOWN")
if [ "$METHOD" != none ]; then
  cmd+=(--kv-sparsity "$METHOD")
  [ -z "$CONFIG" ] || cmd+=(--kv-sparsity-config "$CONFIG")
elif [ -n "$CONFIG" ]; then
  note "KVSPARSE_CONFIG is ignored because KVSPARSE_METHOD=none"
fi
cmd+=(${tail_args[@]+"${tail_args[@]}"})

# The command as logged: --api-key values replaced (vLLM's own log redacts them too).
shown=()
redact=0
api_key_flag=0
for w in "${cmd[@]}"; do
  if [ "$redact" = 1 ] && [ "${w#-}" = "$w" ]; then shown+=(REDACTED); continue; fi
  redact=0
  case "$w" in
    --api-key) redact=1; api_key_flag=1; shown+=("$w") ;;
    --api-key=*) api_key_flag=1; shown+=(--api-key=REDACTED) ;;
    *) shown+=("$w") ;;
  esac
done
[ "$api_key_flag" = 0 ] || note "--api-key is in the arguments; prefer VLLM_API_KEY (e.g. from a secret): it keeps the key out of the process list"

if [ "${KVSPARSE_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${shown[@]}"
  printf '\n'
  exit 0
fi
note "$(printf '%q ' "${shown[@]}")"
exec "${cmd[@]}"
