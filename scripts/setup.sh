#!/usr/bin/env bash
# Idempotent set-up: creates .venv in the checkout and installs volumes with
# everything the tests need. A second run on an installed checkout only checks
# a stamp and returns in about a second.
#
# Note: timm needs torchvision, and PyPI's torchvision wheels pair with the
# CUDA build of torch (which runs fine on a CPU), so the first run downloads
# torch with its CUDA libraries (several GB, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv"
extras="${VOLUMES_EXTRAS:-dev,dicom,peft,pretrain,nnunet}"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi

# The stamp records what was installed; the same inputs mean nothing to do.
stamp_file="$venv/.volumes-setup-stamp"
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$extras
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
    && "$venv/bin/python" -c "import volumes" 2>/dev/null; then
    echo "[setup] $venv is up to date"
    exit 0
fi

echo "[setup] installing volumes[$extras] into $venv (first run: several minutes)"
"$venv/bin/python" -m pip install --quiet --upgrade pip uv
# uv resolves and installs the multi-GB torch stack several times faster than pip.
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" -e ".[$extras]"
echo "$stamp" > "$stamp_file"
echo "[setup] done: $("$venv/bin/python" -c 'import torch, timm, monai; print(f"torch {torch.__version__}, timm {timm.__version__}, monai {monai.__version__}")')"
