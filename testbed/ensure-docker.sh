#!/usr/bin/env bash
# Make sure a Docker daemon answers and the testbed's base image exists.
#
# Fresh CI machines have the docker client but no daemon and no reachable registry, so
# the daemon is started here (loopback-only: no bridge, no iptables) and the base image
# is built with debootstrap from the mirror apt is already configured with. On a machine
# that can pull images, FABFLEET_BASE_FROM_REGISTRY=1 builds it from debian:bookworm-slim.
set -euo pipefail

BASE_IMAGE=${FABFLEET_BASE_IMAGE:-fabfleet-base:bookworm-2}  # bump the tag when PACKAGES change
PACKAGES=openssh-server,python3,python3-venv,rsync,pypy3,procps

if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null; then
        echo "ensure-docker: dockerd is not installed; run ./dev setup (it installs docker.io)" >&2
        exit 1
    fi
    echo "ensure-docker: starting dockerd (log: /tmp/fabfleet-dockerd.log)"
    nohup dockerd --bridge=none --iptables=false --ip6tables=false >/tmp/fabfleet-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "ensure-docker: dockerd did not come up; see /tmp/fabfleet-dockerd.log" >&2; exit 1; }
fi

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    exit 0
fi

if [ "${FABFLEET_BASE_FROM_REGISTRY:-0}" = 1 ]; then
    echo "ensure-docker: building $BASE_IMAGE from debian:bookworm-slim"
    printf 'FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y --no-install-recommends %s && rm -rf /var/lib/apt/lists/*\n' \
        "${PACKAGES//,/ }" | docker build -t "$BASE_IMAGE" -
    exit 0
fi

# The mirror apt already uses: no host name is written into the repository.
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "ensure-docker: cannot find an apt mirror in /etc/apt" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/fabfleet-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "ensure-docker: debootstrap bookworm from $mirror (about a minute)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$mirror" >/tmp/fabfleet-debootstrap.log 2>&1 \
    || { echo "ensure-docker: debootstrap failed; see /tmp/fabfleet-debootstrap.log" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
echo "ensure-docker: built $BASE_IMAGE"
