#!/usr/bin/env bash
# Builds the local base image meshvpn/debian-base:bookworm with debootstrap + `docker import`.
#
# Why: the compose topology must build on machines that can reach Debian's mirror but no container registry,
# so nothing here pulls an image. The image already holds every Debian package compose/Dockerfile needs
# (python3 + venv, wireguard-go, wireguard-tools, iproute2, ping, mosquitto and its clients), which makes the
# Dockerfile's apt step a no-op: the image build itself needs no network at all.
#
# Usage (root): compose/build-base-image.sh [--force]
#   --force            rebuild even if the tag already exists
#   MESHVPN_BASE_TAG   image tag (default meshvpn/debian-base:bookworm)
#   DEBIAN_MIRROR      mirror URL (default: the Debian mirror configured in /etc/apt/sources.list*)
set -euo pipefail

TAG=${MESHVPN_BASE_TAG:-meshvpn/debian-base:bookworm}
SUITE=bookworm
# Keep in step with BASE_PACKAGES in compose/Dockerfile.
PACKAGES=python3,python3-venv,wireguard-go,wireguard-tools,iproute2,iputils-ping,mosquitto,mosquitto-clients,procps,ca-certificates

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build-base-image: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "build-base-image: debootstrap needs root" >&2
  exit 1
fi
if [ "$force" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "build-base-image: $TAG already exists (use --force to rebuild)"
  exit 0
fi

MIRROR=$("$(dirname "$0")/debian-mirror")

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "build-base-image: apt-get install debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

rootfs=$(mktemp -d /var/tmp/meshvpn-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$rootfs"; }
trap cleanup EXIT

echo "build-base-image: debootstrap $SUITE from $MIRROR into $rootfs"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  tail -30 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  exit 1
}
rm -f "$rootfs.log"

# The image's own apt configuration, so `apt-get install` inside a derived image works where the mirror is
# reachable.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
# Keep the image small: package caches and lists, documentation and man pages are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
# The Debian mosquitto package would start a broker from its own config; the compose service passes its own.
: >"$rootfs/etc/machine-id"

tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "meshvpn base: debootstrap $SUITE minbase + $PACKAGES" \
  - "$TAG" >/dev/null
echo "build-base-image: built $TAG in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%d MB", $1/1e6}'))"
