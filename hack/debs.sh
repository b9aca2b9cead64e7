#!/usr/bin/env bash
# The real peers the tests and benchmarks run against, from Debian: dcmtk (storescu,
# storescp, echoscu, findscu), Orthanc with its DICOMweb and PostgreSQL plugins,
# dicom3tools (dciodvfy), Prometheus (the autoscaler's Prometheus source; promtool checks
# the alert rules), PostgreSQL 15 (throwaway clusters for the PostgreSQL catalog's
# tests, tests/postgres.py) and HAProxy (the load balancer in front of a site's gateways,
# tests/haproxy.py).
# A no-op when they are installed already.
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb orthanc-postgresql dicom3tools prometheus postgresql-15 haproxy
  containerd runc containernetworking-plugins buildah debootstrap docker-registry)
need=()
for cmd_pkg in storescu:dcmtk haproxy:haproxy Orthanc:orthanc dciodvfy:dicom3tools prometheus:prometheus \
  containerd:containerd runc:runc buildah:buildah debootstrap:debootstrap docker-registry:docker-registry; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
done
[[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb)
[[ -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ]] || need+=(orthanc-postgresql)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
# Not on PATH: Debian keeps each major version's server binaries apart.
[[ -x /usr/lib/postgresql/15/bin/initdb && -x /usr/lib/postgresql/15/bin/pg_ctl ]] \
  || need+=(postgresql-15)
[[ ${#need[@]} -eq 0 ]] && exit 0
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
echo "installing ${packages[*]} from Debian" >&2
"${sudo[@]}" apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
  "${packages[@]}" >&2
