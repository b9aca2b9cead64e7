#!/usr/bin/env bash
# The real DICOM peers the tests and benchmarks run against, from Debian: dcmtk (storescu,
# storescp, echoscu, findscu), Orthanc with its DICOMweb plugin, dicom3tools (dciodvfy),
# and Prometheus (the autoscaler's Prometheus source; promtool checks the alert rules).
# A no-op when they are installed already.
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools prometheus)
need=()
for cmd_pkg in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools prometheus:prometheus; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
done
[[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
[[ ${#need[@]} -eq 0 ]] && exit 0
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
echo "installing ${packages[*]} from Debian" >&2
"${sudo[@]}" apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
  "${packages[@]}" >&2
