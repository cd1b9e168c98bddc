#!/usr/bin/env bash
# Build local/debian-py:bookworm (Debian 12 + python3.11 + venv) from Debian packages with
# debootstrap, for machines that reach a Debian mirror but no container registry.
# Usage: sudo docker/build-base-image.sh [mirror]   (default: the first URI in apt's debian.sources)
set -euo pipefail
mirror="${1:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
tar -C "$rootfs" -c . | docker import - local/debian-py:bookworm
echo "built local/debian-py:bookworm; build with BASE_IMAGE=local/debian-py:bookworm"
