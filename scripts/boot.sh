#!/usr/bin/env bash
# The main job: set up, build fabvm, and boot the test guest (2 vCPUs, 512 MiB: fill,
# verify twice, power off). Extra arguments replace the guest's command line.
# FABVM_GUEST=linux boots Debian's kernel with the busybox initramfs instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cargo build --release --quiet -p vmm --bin fabvm --manifest-path "$root/Cargo.toml"
fabvm="$root/target/release/fabvm"
if [ "${FABVM_GUEST:-test}" = linux ]; then
	debian="$root/guest-images/out/debian"
	exec "$fabvm" --kernel "$debian/vmlinux" --initrd "$debian/initramfs.cpio.gz" --mem 1G \
		--cmdline "${*:-console=ttyS0 earlyprintk=serial reboot=k panic=-1}"
fi
exec "$fabvm" --kernel "$root/guest-images/out/test-guest.elf" --mem 512M --cpus 2 \
	--cmdline "${*:-cpus=2 passes=2 share=50}"
