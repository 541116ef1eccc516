#!/usr/bin/env bash
# Installs what fabvm's build, guest images and tests need on a fresh Debian machine, then
# builds the guest images. Idempotent and quiet when everything is already there.
# Sourced by scripts/boot.sh and scripts/test.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH=$PATH:/usr/sbin:/sbin # mkfs.ext4, debugfs, e2fsck live there

setup_log() { echo "setup: $*" >&2; }

# Debian packages: compiler and binutils for the test guest; busybox-static, cpio, xz and
# zstd for the initramfs; e2fsprogs for the ext4 root image (mkfs.ext4 -d, debugfs) and
# the tests' checks of it; util-linux (unshare, setpriv) and iproute2 for the tests; QEMU
# for the Debian image's TCG test and the side-by-side benchmarks; etcd for the cluster
# registry's tests (a single-node etcd each); protoc and protobuf's well-known types
# (libprotobuf-dev) for the etcd client's build.
need_pkgs=()
for pair in gcc:gcc ld:binutils readelf:binutils busybox:busybox-static cpio:cpio \
	xz:xz-utils zstd:zstd lz4:lz4 objcopy:binutils unshare:util-linux setpriv:util-linux ip:iproute2 dpkg-deb:dpkg iasl:acpica-tools nft:nftables \
	mkfs.ext4:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs qemu-system-x86_64:qemu-system-x86 \
	etcd:etcd-server protoc:protobuf-compiler descriptor.proto:libprotobuf-dev; do
	cmd="${pair%%:*}" pkg="${pair#*:}"
	if [ "$cmd" = busybox ]; then
		[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_pkgs+=("$pkg")
	elif [ "$cmd" = descriptor.proto ]; then
		[ -f /usr/include/google/protobuf/descriptor.proto ] || need_pkgs+=("$pkg")
	else
		command -v "$cmd" >/dev/null || need_pkgs+=("$pkg")
	fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		setup_log "missing packages: ${need_pkgs[*]} (run as root, or apt-get install them)"
		exit 1
	fi
	setup_log "installing ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

command -v cargo >/dev/null || { setup_log "cargo not found: install Rust (rustup)"; exit 1; }

# Guest images: the test guest (built here from source) and Debian's cloud kernel with a
# busybox initramfs (fetched from Debian's archive, version and checksum recorded).
bash "$root/guest-images/build-test-guest.sh" >/dev/null
bash "$root/guest-images/debian-kernel.sh" >/dev/null
