#!/usr/bin/env bash
# The project's GPU checks for a session that is lent a GPU machine (docs/gpu.md says how to run them).
#
#   bash bench/gpu_session.sh prepare         # here, with the package registry: fill .carry/ (git-ignored)
#   bash bench/gpu_session.sh run [ARGS]      # there: every step in order of value, figures into $OUT
#   bash bench/gpu_session.sh run --tiny      # the same commands at toy sizes: a CPU dry run (tests do this)
#
# `prepare` downloads exactly what the GPU machine's image lacks (bench/carried_wheels.txt: cp312 manylinux
# wheels; the image's own packages are bench/device_packages.txt) into .carry/wheels and copies the real
# GPT-NeoX-20B tokenizer to .carry/20B_tokenizer.json. `run` installs those wheels into a temporary site
# directory when they are there, puts it and this checkout on PYTHONPATH ahead of whatever PYTHONPATH already
# holds, points NEOX_TOKENIZER at the carried tokenizer, then runs python -m bench.gpu_session (ARGS go to
# it: --tiny, --only STEP,..., --budget SECONDS, --list). $OUT (default /tmp/gpu_out) receives
# gpu_session.json, rewritten as each step ends, and gpu_session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
PY="${PYTHON:-python3}"

prepare() {
  set -e
  rm -rf "$CARRY/wheels"
  mkdir -p "$CARRY/wheels"
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$CARRY/wheels" -r bench/carried_wheels.txt
  local tokenizer="${NEOX_TOKENIZER:-../shared/data/20B_tokenizer.json}"
  if [ -f "$tokenizer" ]; then
    install -m 0644 "$tokenizer" "$CARRY/20B_tokenizer.json"
  else
    echo "warning: no tokenizer at $tokenizer (set NEOX_TOKENIZER): the streaming tests will skip there" >&2
  fi
  ls -l "$CARRY" "$CARRY/wheels"
  du -sh "$CARRY"
  echo "carry: [\"$CARRY\"]   (git-ignored; name it in the device tool's carry)"
}

run() {
  local site
  site="$(mktemp -d /tmp/gpu_session_site.XXXXXX)"
  if ! compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    echo "note: no wheels in $CARRY/wheels (bash bench/gpu_session.sh prepare): using this Python's packages"
  elif ! "$PY" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 12) or platform.machine() != "x86_64")'; then
    echo "note: $CARRY/wheels are for CPython 3.12 on x86-64, not this Python: using its own packages"
  else
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "$CARRY"/wheels/*.whl || { echo "error: installing $CARRY/wheels failed" >&2; exit 2; }
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  if [ -z "${NEOX_TOKENIZER:-}" ] && [ -f "$CARRY/20B_tokenizer.json" ]; then
    export NEOX_TOKENIZER="$PWD/$CARRY/20B_tokenizer.json"
  fi
  local out="${OUT:-/tmp/gpu_out}"
  "$PY" -m bench.gpu_session --out "$out" "$@"
  local status=$?
  rm -rf "$site"
  return $status
}

case "${1:-}" in
prepare) prepare ;;
run) shift; run "$@" ;;
*)
  echo "usage: bash bench/gpu_session.sh prepare | run [--tiny] [--only STEP,...] [--budget SECONDS] [--list]" >&2
  exit 2
  ;;
esac
