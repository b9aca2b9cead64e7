#!/usr/bin/env bash
# `make image`: the image built from the Dockerfile with buildah, without Docker or a
# registry, imported into the local node's containerd (hack/containerd.sh). Prints the
# image reference on its last line. A no-op when containerd holds the image of these
# inputs already (the tag is a hash of everything the build reads).
#   hack/image.sh                 build and import
#   REGISTRY=host/path hack/image.sh   build, import, and push to REGISTRY/telerad:TAG
#     (REGISTRY_TLS_VERIFY=false for a registry served over plain HTTP)
#
# The Dockerfile is built unchanged; only its two base-image arguments are pointed at
# images made here, so nothing is pulled:
# - PYTHON_IMAGE: Debian bookworm's own Python 3.11 (debootstrap --variant=minbase), in
#   place of the python:3.11-slim-bookworm image, which no registry here serves. Kept
#   under its own name rather than tagged as the Docker Hub image, which it is not.
# - UV_IMAGE: uv's binary from its PyPI wheel (the copy hack/uv.sh runs), in place of
#   ghcr.io/astral-sh/uv at the same version; the uv stage copies only /uv out of it.
# The build's `uv pip install` reaches PyPI through the host network (every wheel is
# hash-checked against uv.lock), with the host's uv cache mounted so warm builds
# download nothing, and trusting the CAs the host trusts (this machine's egress goes
# through a TLS-inspecting proxy whose CA only the host's bundle holds; uv's own roots
# refuse it: "invalid peer certificate: UnknownIssuer"). These mounts are the RUN
# steps' only: nothing of them is in the image.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${TELERAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telerad}"
mirror="${TELERAD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
# What python:3.11-slim-bookworm has that telerad uses: CA certificates (webhooks and
# destinations over HTTPS), /etc/services and /etc/protocols (netbase), and the venv
# module that hack/install-wheel.sh makes /opt/telerad with.
base_packages=python3,python3-venv,ca-certificates,netbase
export BUILDAH_RUNTIME=/usr/sbin/runc   # crun refuses this host's hybrid cgroups

log() { echo "image.sh: $*" >&2; }
for tool in buildah debootstrap ctr containerd; do
  command -v "$tool" >/dev/null || { log "needs $tool (make debs)"; exit 2; }
done
[[ $(id -u) -eq 0 ]] || { log "buildah and containerd here need root"; exit 2; }

has_image() { buildah images --quiet "$1" >/dev/null 2>&1; }

# The base: debootstrap is the slow part (over 3 minutes here), so its root filesystem is kept
# as a tarball in the cache (which CI keeps), keyed on the recipe.
base_key="$(echo "$suite $base_packages v1" | sha256sum | cut -c1-12)"
base_image="localhost/telerad-python:3.11-$suite-$base_key"
if ! has_image "$base_image"; then
  tarball="$cache/image/python-$suite-$base_key.tar"
  if [[ ! -f $tarball ]]; then
    log "debootstrap $suite with $base_packages (cached in $tarball)"
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" >&2
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    mkdir -p "$cache/image"
    # /dev, /proc and /sys are the runtime's to mount; debootstrap leaves device nodes.
    tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  container="$(buildah from scratch)"
  buildah add --quiet "$container" "$tarball" / >&2
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$container"
  buildah commit --quiet --rm "$container" "$base_image" >/dev/null
fi

uv_version="$(hack/uv.sh --version | awk '{print $2}')"
grep -q "^ARG UV_IMAGE=.*:$uv_version$" Dockerfile \
  || { log "hack/uv.sh runs uv $uv_version but the Dockerfile's UV_IMAGE is another"; exit 1; }
uv_image="localhost/telerad-uv:$uv_version"
if ! has_image "$uv_image"; then
  container="$(buildah from scratch)"
  buildah copy --quiet --chmod 0755 "$container" "$cache/uv-$uv_version/bin/uv" /uv >&2
  buildah commit --quiet --rm "$container" "$uv_image" >/dev/null
fi

# Everything the build reads (the Dockerfile's COPY lines, and this recipe).
inputs="$( (
  echo "$base_image $uv_image"
  sha256sum Dockerfile .dockerignore pyproject.toml uv.lock README.md hack/install-wheel.sh \
    hack/image.sh
  find telerad -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
    | sort -z | xargs -0 sha256sum
) | sha256sum | cut -c1-12)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
image="localhost/telerad:$version-$inputs"

working() { buildah containers --quiet --filter "ancestor=$1" 2>/dev/null | sort; }

build() {
  log "building $image"
  local before rc=0
  before="$( (working "$uv_image"; working "$image") | sort)"
  host_ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
  uv_config="$cache/image/uv.toml"
  mkdir -p "$cache/image"
  echo "system-certs = true" >"$uv_config"
  buildah bud --runtime /usr/sbin/runc --pull=never --network=host \
    --volume "$(hack/uv.sh cache dir):/root/.cache/uv" \
    --volume "$host_ca:/etc/ssl/certs/ca-certificates.crt:ro" \
    --volume "$uv_config:/etc/uv/uv.toml:ro" \
    --build-arg "PYTHON_IMAGE=$base_image" --build-arg "UV_IMAGE=$uv_image" \
    --tag "$image" "$root" >&2 || rc=$?
  # buildah 1.28 leaves the working containers of the uv stage's image and of the last
  # stage behind after every build, failed or not (each pins its image): remove the ones
  # it just made.
  comm -13 <(echo "$before") <( (working "$uv_image"; working "$image") | sort) \
    | xargs --no-run-if-empty buildah rm >/dev/null
  return "$rc"
}

# Each build of other sources is another half gigabyte: a checkout keeps only its latest
# image, unless another checkout's latest is the same (checkouts share the node).
forget_previous() {
  local marks="$cache/image/latest" mark previous digest
  mark="$marks/$(echo "$root" | sha256sum | cut -c1-12)"
  mkdir -p "$marks"
  previous="$(cat "$mark" 2>/dev/null || true)"
  echo "$image" >"$mark"
  [[ -n $previous && $previous != "$image" ]] || return 0
  ! grep -qxF "$previous" "$marks"/* || return 0
  digest="$(hack/containerd.sh ctr images ls "name==$previous" | awk 'NR > 1 {print $3}')"
  # The CRI plugin names each image by its ID as well; that name would keep it stored.
  hack/containerd.sh ctr images ls | awk -v d="$digest" 'NR > 1 && d != "" && $3 == d {print $1}' \
    | xargs --no-run-if-empty "$root/hack/containerd.sh" ctr images rm >/dev/null
  buildah rmi "$previous" >/dev/null 2>&1 || true   # gone already when buildah storage was reset
}

if ! hack/containerd.sh ctr images ls --quiet "name==$image" | grep -q .; then
  has_image "$image" || build
  archive="$(mktemp --suffix=.tar)"
  trap 'rm -f "$archive"' EXIT
  buildah push --quiet "$image" "docker-archive:$archive:$image" >&2
  hack/containerd.sh ctr images import "$archive" >&2
  rm -f "$archive"
  trap - EXIT
  forget_previous
fi
if [[ -n ${REGISTRY:-} ]]; then
  has_image "$image" || build   # buildah's copy may have been removed since the import
  pushed="$REGISTRY/telerad:$version-$inputs"
  log "pushing $pushed"
  buildah push --quiet --tls-verify="${REGISTRY_TLS_VERIFY:-true}" "$image" "docker://$pushed" >&2
  image="$pushed"
fi
echo "$image"
