#!/usr/bin/env bash
# Create or reuse the project virtualenv at .venv and install everything the project needs.
# Idempotent: a stamp file records the hash of the requirement files, so a second call is instant.
# Order matters: torch goes in first (the local CPU wheel when no CUDA driver is present), then the
# rest under a constraint that pins it, so nothing drags in a newer CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

hash=$(cat requirements/*.txt pyproject.toml tools/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.infoview-installed-$hash"
if [ -f "$stamp" ]; then exit 0; fi

# System libraries ffcv compiles against (and ffmpeg for the video tools). Installed only when missing.
need=()
for pkg in libturbojpeg0-dev libopencv-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "pip>=24" "setuptools>=70" wheel

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already present"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA driver found: installing torch==$TORCH_VERSION from the package index"
  "${pip[@]}" install "torch==$TORCH_VERSION"
else
  echo "[setup] no CUDA driver: installing the CPU build torch==$TORCH_VERSION"
  "${pip[@]}" install "torch==$TORCH_VERSION"
fi
installed=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' requirements/constraints.txt >"$constraints"
echo "torch==$installed" >>"$constraints"

echo "[setup] installing pinned dependencies (ffcv compiles its extension: a minute or two)"
"${pip[@]}" install -c "$constraints" -r requirements/base.txt -r requirements/test.txt
"${pip[@]}" install -c "$constraints" --no-deps --no-build-isolation -e .
rm -f "$VENV"/.infoview-installed-*
touch "$stamp"
echo "[setup] ready: $VENV"
