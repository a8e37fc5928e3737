#!/usr/bin/env bash
# Build the stemstream container image (deploy/Containerfile) with podman, from the repository.
#
#   deploy/build-image.sh [TAG]          (default stemstream:<version in pyproject.toml>)
#
# The base is the official python:3.11-slim image. Where no container registry is reachable (a
# facility's build host that reaches only its package mirrors), the base is made instead from
# Debian's own packages: debootstrap (bookworm, minbase, python3) from the host's Debian mirror,
# imported as localhost/stemstream-base:bookworm. Both bases give the same installed package.
# pip inside the build trusts the host's CA bundle (for a TLS-intercepting proxy); set
# STEMSTREAM_BUILD_CA to another PEM file, or to "" for none. Build steps run with
# --isolation chroot, which works where nested containers cannot (no cgroups, no namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
tag=${1:-stemstream:$version}
official=docker.io/library/python:3.11-slim
debian_base=localhost/stemstream-base:bookworm
ca=${STEMSTREAM_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}

for tool in podman; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool not found; install it (apt-get install -y podman buildah)" >&2; exit 2; }
done

if timeout 60 podman pull -q "$official" >/dev/null 2>&1; then
  base=$official
else
  echo "build-image: cannot pull $official (no container registry reachable); building the base from Debian's packages" >&2
  if ! podman image exists "$debian_base"; then
    command -v debootstrap >/dev/null || { echo "build-image: debootstrap not found; install it (apt-get install -y debootstrap)" >&2; exit 2; }
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /var/tmp/stemstream-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-image: debootstrap bookworm from $mirror (about 2 minutes)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q - "$debian_base" >/dev/null
  fi
  base=$debian_base
fi

args=(--isolation chroot --build-arg "BASE=$base" -f deploy/Containerfile -t "$tag")
if [ -n "$ca" ] && [ -r "$ca" ]; then
  args+=(--build-arg PIP_CERT=/etc/ssl/build-ca.pem -v "$ca:/etc/ssl/build-ca.pem:ro")
fi
echo "build-image: building $tag on $base" >&2
podman build -q "${args[@]}" . >/dev/null
echo "$tag"
