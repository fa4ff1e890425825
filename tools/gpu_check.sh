#!/usr/bin/env bash
# One prepared run of everything that needs a GPU: tools/gpu_check.py does the work (stages:
# probe, compile, tests, correctness, kernels, train, dali; see `python -m tools.gpu_check --help`).
#
#   bash tools/gpu_check.sh [driver args]      # on the GPU machine; results in $OUT (or results/gpu)
#   bash tools/gpu_check.sh prepare            # here: fetch the wheels the GPU machine lacks
#   bash tools/gpu_check.sh stash              # on the GPU machine: keep carried DALI parts in /tmp
#   bash tools/gpu_check.sh --dry-run          # no GPU: every stage at toy sizes on the CPU
#
# The lent machine (one H200, python 3.12, torch 2.11, triton 3.6, accelerate; no DALI, ffcv,
# webdataset, simplejpeg, and no network) gets what it lacks as carried files:
#   .whl/          small wheels (simplejpeg: the synthetic JPEG set of the dali stage), installed into
#                  /tmp/site at the start of every run
#   .dali_parts/   DALI's wheel (~210 MB) split into parts under the 64 MiB a call may carry; each
#                  `stash` call (consecutive calls, within the machine's 30 s warm window) appends
#                  its part to /tmp/infoview_parts; a run finding all parts there (checked against
#                  the sha256 in .dali_parts/SHA256) installs DALI and runs the dali stage.
# Call plan inside a 15-minute lease: call 1 `bash tools/gpu_check.sh` carrying .whl and the small
# last part with NAME and SHA256 (all stages but dali, ~8 min with the machine's start); only with
# >= 5 minutes left, the DALI calls: `stash` carrying part-00, then part-01, then
# `bash tools/gpu_check.sh --stages dali` carrying part-02 (a run stashes what it carries first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PARTS=/tmp/infoview_parts

case "${1:-}" in
  -h|--help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exec "$PY" -m tools.gpu_check --help ;;
  prepare)
    # Here, with network: wheels for the GPU machine's python (3.12, manylinux x86-64).
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qxF '/.dali_parts/' .git/info/exclude 2>/dev/null || echo '/.dali_parts/' >> .git/info/exclude
    mkdir -p .whl .dali_parts
    dl="$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    $dl -d .whl "simplejpeg==$(sed -n 's/^simplejpeg==//p' requirements/base.txt)"
    tmp=$(mktemp -d)
    $dl -d "$tmp" "nvidia-dali-cuda130==$(sed -n 's/^nvidia-dali-cuda130==//p' requirements/base.txt)"
    whl=$(ls "$tmp"/nvidia_dali*.whl)
    rm -f .dali_parts/*
    (cd .dali_parts && split -b 60M -d "$whl" part- && basename "$whl" > NAME && sha256sum "$whl" | cut -d' ' -f1 > SHA256)
    rm -rf "$tmp"
    ls -l .whl .dali_parts
    exit 0 ;;
  stash)
    mkdir -p "$PARTS"
    cp -v .dali_parts/* "$PARTS"/
    exit 0 ;;
esac

# Carried packages are for the GPU machine (python 3.12 wheels): installed only where CUDA is.
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  if compgen -G ".dali_parts/*" > /dev/null; then  # parts carried with this call count too
    mkdir -p "$PARTS" && cp .dali_parts/* "$PARTS"/
  fi
  if [ -f "$PARTS/SHA256" ] && [ -f "$PARTS/NAME" ]; then
    whl="/tmp/$(cat "$PARTS/NAME")"
    cat "$PARTS"/part-* > "$whl"
    if [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$(cat "$PARTS/SHA256")" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_dali "$whl"
      # Its own folder: DALI's `nvidia` package must not shadow the nvidia-* CUDA wheels torch loads.
      if PYTHONPATH=/tmp/site_dali:${PYTHONPATH:-} "$PY" -c "import torch, nvidia.dali" 2>/dev/null; then
        export PYTHONPATH=/tmp/site_dali:${PYTHONPATH:-}
      else
        echo "gpu_check.sh: DALI installed but 'import torch, nvidia.dali' fails with it: the dali stage will skip" >&2
      fi
    else
      echo "gpu_check.sh: DALI parts in $PARTS are incomplete (sha256 differs): the dali stage will skip" >&2
    fi
  fi
fi
export PYTHONUNBUFFERED=1
out=()
if [ -n "${OUT:-}" ]; then out=(--out "$OUT"); fi  # the device tool's $OUT comes back to the caller
exec "$PY" -m tools.gpu_check "${out[@]}" "$@"
