#!/usr/bin/env bash
# Install the Debian tools the DICOM SR, PACS and viewer tests use, only when one is missing:
#   dcmtk (dsrdump), dicom3tools (dciodvfy), orthanc + orthanc-dicomweb (the test PACS),
#   chromium (the browser playwright drives headless for the OHIF tests; never `playwright install`).
# Idempotent: with every binary present it does nothing. Without root or apt-get it installs nothing
# and says so; the tests that need a missing binary then skip with the reason.
set -euo pipefail

ORTHANC_DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

missing=()
command -v dsrdump >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -e "$ORTHANC_DICOMWEB_PLUGIN" ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  echo "== system tools present: dsrdump, dciodvfy, Orthanc with DICOMweb, chromium"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "== not root: not installing ${missing[*]} (the tests that need them will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "== no apt-get: not installing ${missing[*]} (the tests that need them will skip)"
  exit 0
fi
echo "== installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The orthanc package tries to start its system service; without an init system that fails
# harmlessly (the test PACS runs its own Orthanc in a private network namespace).
apt-get install -y -qq --no-install-recommends "${missing[@]}"
