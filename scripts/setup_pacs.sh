#!/usr/bin/env bash
# Idempotent set-up for `volumes pacs` and its tests: the Orthanc PACS (with its
# DICOMweb plugin) that tests/test_pacs_*.py start on loopback ports, dicom3tools
# (dciodvfy, dcentvfy: conformance checks of the SEG and SR we write) and dcmtk
# (storescu/findscu, handy to poke a node by hand). Python packages (pynetdicom,
# dicomweb-client) come with the `pacs` extra, which `dev` includes.
#
# apt-get runs only when a tool is missing and only where apt-get exists and we are
# root (or have sudo); elsewhere it says what to install and exits 0, so the tests skip
# with a clear reason instead of CI failing on set-up.
set -uo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)

if [ ${#missing[@]} -eq 0 ]; then
    echo "[setup_pacs] Orthanc, its DICOMweb plugin, dicom3tools and dcmtk are installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
fi
if ! command -v apt-get >/dev/null 2>&1 || { [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; }; then
    echo "[setup_pacs] WARNING: cannot install ${missing[*]} (no apt-get or not root); the PACS tests will skip"
    exit 0
fi

echo "[setup_pacs] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# the package lists may be stale or absent on a fresh image
$sudo apt-get update -qq || echo "[setup_pacs] WARNING: apt-get update failed"
if ! $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    echo "[setup_pacs] WARNING: apt-get install ${missing[*]} failed; the PACS tests will skip"
    exit 0
fi
# The Debian package starts a system Orthanc on 4242/8042 where an init system runs;
# the tests start their own on free ports, so stop that one where it is running.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    $sudo systemctl stop orthanc || true
fi
echo "[setup_pacs] done: $(Orthanc --version 2>/dev/null | head -1)"
