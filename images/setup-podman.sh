#!/usr/bin/env bash
# Prepare this machine to build and run kubeseg's images with podman, without a registry:
#   - installs podman, runc and debootstrap (Debian/Ubuntu; needs root),
#   - configures podman for machines where crun and default ulimits are refused,
#   - makes the base image localhost/kubeseg-base:bookworm from Debian's packages
#     (Python 3.11, as in python:3.11-slim-bookworm), unless it exists already.
# Used by `make test-containers`; on a machine that can pull images, `make images` needs none of it.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/kubeseg-base:bookworm}"
SUITE="${SUITE:-bookworm}"

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi

# crun refuses on cgroup-v1/hybrid hosts, and containers may not set RLIMIT_NOFILE/NPROC here.
conf=/etc/containers/containers.conf
if ! grep -qs '^# kubeseg: podman settings' "$conf"; then
  mkdir -p /etc/containers
  cat >>"$conf" <<'CONF'
# kubeseg: podman settings (runc, no default ulimits)
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
fi

if podman image exists "$BASE_IMAGE"; then
  echo "base image $BASE_IMAGE: present"
  exit 0
fi

# The Debian mirror this machine already uses.
mirror="$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
          | head -n1 | awk '{print $2}' || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/kubeseg-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "building $BASE_IMAGE from $mirror ($SUITE, minbase)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE: built"
