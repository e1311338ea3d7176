#!/usr/bin/env bash
# Idempotent set-up of the OHIF viewer beside the archive (docs/PACS.md, "See the results in OHIF"):
#
# * the built viewer: the `dist/` folder of the npm package @ohif/app (pinned), fetched with
#   `npm pack` (the one tarball, checked against the registry's integrity hash; no dependency
#   tree, nothing built) into .viewer/ohif-<version>/, which `volumes pacs viewer --ohif` serves;
# * for tests/test_viewer_ohif.py: Debian's chromium and chromium-driver (apt-get, only where we
#   are root or have sudo) and selenium (pip, into .venv). Without them that test skips and says why.
#
# A second run does nothing but check. It never fails CI by itself: what it cannot install it names.
set -uo pipefail
cd "$(dirname "$0")/.."
OHIF_VERSION="${OHIF_VERSION:-3.13.2}"   # keep equal to volumes.pacs.viewer.OHIF_VERSION
target=".viewer/ohif-${OHIF_VERSION}"

if [ -f "$target/index.html" ] && ls "$target"/app.bundle.*.js >/dev/null 2>&1; then
    echo "[setup_viewer] OHIF ${OHIF_VERSION} is in $target"
elif ! command -v npm >/dev/null 2>&1; then
    echo "[setup_viewer] WARNING: npm not found (apt-get install npm, or Node.js >= 18); OHIF not installed"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "[setup_viewer] fetching @ohif/app@${OHIF_VERSION} (about 50 MB)"
    if (cd "$work" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null) \
        && tar -xzf "$work"/ohif-app-"${OHIF_VERSION}".tgz -C "$work" package/dist package/LICENSE; then
        mkdir -p .viewer
        rm -rf "$target.partial"
        mv "$work/package/dist" "$target.partial"
        cp "$work/package/LICENSE" "$target.partial/OHIF-LICENSE"
        rm -rf "$target" && mv "$target.partial" "$target"   # complete or absent, never half there
        echo "[setup_viewer] OHIF ${OHIF_VERSION} installed in $target"
    else
        echo "[setup_viewer] WARNING: npm pack @ohif/app@${OHIF_VERSION} failed; OHIF not installed"
    fi
fi

# the browser test: Chromium and its driver from Debian, selenium from PyPI
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
        echo "[setup_viewer] installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get update -qq || echo "[setup_viewer] WARNING: apt-get update failed"
        $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || echo "[setup_viewer] WARNING: apt-get install ${missing[*]} failed; the browser test will skip"
    else
        echo "[setup_viewer] WARNING: cannot install ${missing[*]} (no apt-get or not root); the browser test will skip"
    fi
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import selenium" 2>/dev/null; then  # also in the dev extra
    .venv/bin/python -m pip install -q "selenium>=4.20" || echo "[setup_viewer] WARNING: pip install selenium failed"
fi
echo "[setup_viewer] done"
