#!/usr/bin/env bash
# Builds a minimal Debian base image locally, for machines where no base image can be pulled
# from a registry: debootstrap (minbase variant) into a temporary root, tar it, `docker import`.
#
#   deploy/base/make-base.sh [--force]
#
# Environment (all optional):
#   KT_BASE_SUITE   Debian suite (default bookworm; the host binaries are built against its glibc)
#   KT_BASE_TAG     image tag to create (default kt-base:$KT_BASE_SUITE)
#   KT_BASE_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#   KT_CACHE        cache folder (default ~/.cache/kt); the rootfs tarball is kept in
#                   $KT_CACHE/base/, so a rerun (or a machine whose image store was wiped) only
#                   re-imports it. --force rebuilds the tarball too.
#
# Needs root for debootstrap (uses sudo when not root). Prints the image tag on its last line.
set -euo pipefail

suite="${KT_BASE_SUITE:-bookworm}"
tag="${KT_BASE_TAG:-kt-base:$suite}"
mirror="${KT_BASE_MIRROR:-http://deb.debian.org/debian}"
cache="${KT_CACHE:-$HOME/.cache/kt}/base"
tarball="$cache/debian-$suite-minbase-amd64.tar"
force=0
[[ "${1:-}" == "--force" ]] && force=1

sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if [[ $force -eq 0 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "make-base: $tag already exists (use --force to rebuild)" >&2
  echo "$tag"
  exit 0
fi

mkdir -p "$cache"
if [[ $force -eq 1 || ! -s "$tarball" ]]; then
  command -v debootstrap >/dev/null || { echo "make-base: install debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
  root="$(mktemp -d "${TMPDIR:-/tmp}/kt-base-rootfs.XXXXXX")"
  trap 'sudo_if_needed rm -rf "$root"' EXIT
  echo "make-base: debootstrap $suite from $mirror" >&2
  sudo_if_needed debootstrap --variant=minbase --arch=amd64 --include=ca-certificates \
    "$suite" "$root" "$mirror" >&2
  # Full apt sources (updates + security) for images that install packages on top.
  sudo_if_needed tee "$root/etc/apt/sources.list" >/dev/null <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SOURCES
  # Container-friendly apt: no recommends, no docs, no caches left in layers.
  sudo_if_needed tee "$root/etc/apt/apt.conf.d/90kt-container" >/dev/null <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT
  sudo_if_needed tee "$root/etc/dpkg/dpkg.cfg.d/90kt-nodoc" >/dev/null <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
DPKG
  sudo_if_needed chroot "$root" apt-get clean
  sudo_if_needed rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/log/*.log "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/* "$root"/usr/share/info/*
  sudo_if_needed rm -f "$root/etc/hostname" "$root/etc/resolv.conf"
  sudo_if_needed tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  sudo_if_needed chown "$(id -u):$(id -g)" "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
fi

echo "make-base: importing $tarball as $tag" >&2
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $suite" \
  "$tarball" "$tag" >&2
echo "$tag"
