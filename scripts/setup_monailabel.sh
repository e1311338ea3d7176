#!/usr/bin/env bash
# Idempotent set-up of the MONAI Label environment: creates .venv-monailabel in the
# checkout and installs monailabel 0.8.5 together with this project (volumes, editable).
# A second run on an installed checkout only checks a stamp and returns in about a second.
#
# Why a second environment: monailabel 0.8.5 imports pydicom-seg 0.4, which needs
# jsonschema<4 and pydicom 2 (it imports pydicom._storage_sopclass_uids, gone in
# pydicom 3), and its dependencies hold numpy at 1.26; the main environment
# (scripts/setup.sh) runs numpy 2, pydicom 3, highdicom 0.28 and a current jsonschema.
# MONAI 1.6 and this project work with both; with pydicom 2 the resolver picks
# highdicom 0.22 (the last release for pydicom 2). See docs/MONAI_LABEL.md.
#
# Usage: bash scripts/setup_monailabel.sh      (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv-monailabel"
python=${PYTHON:-python3}

# The pins that resolve and run together (uv finds the rest): numpy, jsonschema and
# pydicom are what monailabel's dependencies need at run time (pydicom 3 resolves but
# breaks `import monailabel.app`); pinned so the environment does not drift.
requirements=(
    "monailabel==0.8.5"
    "monai>=1.6,<1.7"
    "numpy==1.26.4"
    "jsonschema>=3.2,<4"
    "pydicom>=2.4.4,<3"
    "pytest>=8"
)

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup-monailabel] creating $venv"
    "$python" -m venv "$venv"
fi
# keep the environment out of git (as `uv venv` does) without touching the repo's .gitignore
[ -f "$venv/.gitignore" ] || echo "*" > "$venv/.gitignore"

# The stamp records what was installed; the same inputs mean nothing to do.
stamp_file="$venv/.volumes-monailabel-stamp"
stamp=$(cat pyproject.toml scripts/setup_monailabel.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
    && [ -x "$venv/bin/monailabel" ] && "$venv/bin/python" -c "import volumes, monailabel" 2>/dev/null; then
    echo "[setup-monailabel] $venv is up to date"
    exit 0
fi

echo "[setup-monailabel] installing monailabel and volumes into $venv (first run: about a minute)"
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet --upgrade pip uv
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" "${requirements[@]}" -e .
# monailabel's wheel ships its `monailabel` launcher under a .data folder named with the
# wheel's build tag (monailabel-0.8.5-202411252313.data), which uv does not install as a
# script; provide the command ourselves (what the launcher runs: python -m monailabel.main).
if [ ! -x "$venv/bin/monailabel" ]; then
    printf '%s\n' '#!/bin/sh' '# monailabel CLI, written by scripts/setup_monailabel.sh' \
        'exec "$(dirname "$0")/python" -m monailabel.main "$@"' > "$venv/bin/monailabel"
    chmod +x "$venv/bin/monailabel"
fi
echo "$stamp" > "$stamp_file"
echo "[setup-monailabel] installed in $(( $(date +%s) - start )) s"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version

names = ["monailabel", "monai", "torch", "numpy", "jsonschema", "pydicom", "highdicom", "fastapi"]
print("[setup-monailabel] done: " + ", ".join(f"{name} {version(name)}" for name in names))
PY
