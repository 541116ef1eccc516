#!/usr/bin/env bash
# Build the fabvm test guest: guest-images/out/test-guest.elf
#
# Uses only the machine's own gcc and binutils (no cross toolchain, no
# downloads). Idempotent: every run rebuilds from source into a temporary
# directory and moves the result into place only when everything succeeded.
# Usage: guest-images/build-test-guest.sh   (env: CC, LD, READELF, OBJDUMP override)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/test-guest"
out="$here/out"
CC="${CC:-gcc}"
LD="${LD:-ld}"
READELF="${READELF:-readelf}"
OBJDUMP="${OBJDUMP:-objdump}"

for tool in "$CC" "$LD" "$READELF" "$OBJDUMP"; do
	command -v "$tool" >/dev/null || { echo "build-test-guest: '$tool' not found" >&2; exit 1; }
done

mkdir -p "$out"
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

common=(-m64 -fno-pic -fno-pie -ffreestanding -fno-stack-protector -fcf-protection=none
	-fno-asynchronous-unwind-tables -fno-unwind-tables -I "$src")
cflags=(-std=gnu11 -O2 -mgeneral-regs-only -mno-red-zone -nostdlib
	-fno-tree-loop-distribute-patterns -Wall -Wextra -Werror)

"$CC" "${common[@]}" -c "$src/boot.S" -o "$tmp/boot.o"
"$CC" "${common[@]}" "${cflags[@]}" -c "$src/main.c" -o "$tmp/main.o"
"$CC" "${common[@]}" "${cflags[@]}" -c "$src/virtio.c" -o "$tmp/virtio.o"
"$LD" -nostdlib -static -no-pie -z max-page-size=4096 -z noexecstack \
	-T "$src/link.ld" -o "$tmp/test-guest.elf" "$tmp/boot.o" "$tmp/main.o" "$tmp/virtio.o"

# Sanity checks: the PVH entry note must be there and point at pvh_start32,
# and the image must stay clear of the SSE/x87 instructions ring 3 cannot use.
entry="$("$READELF" -sW "$tmp/test-guest.elf" | awk '$8 == "pvh_start32" { print $2 }')"
note="$("$READELF" -nW "$tmp/test-guest.elf")"
if ! grep -qE 'Xen[[:space:]]+0x00000008[[:space:]].*\(0x00000012\)' <<<"$note"; then
	echo "build-test-guest: PVH note (owner Xen, type 18, 8-byte descriptor) missing:" >&2
	echo "$note" >&2
	exit 1
fi
if ! "$READELF" -lW "$tmp/test-guest.elf" | grep -q 'NOTE'; then
	echo "build-test-guest: no PT_NOTE program header" >&2
	exit 1
fi
if [ -z "$entry" ]; then
	echo "build-test-guest: pvh_start32 not found" >&2
	exit 1
fi
bad_insn='%[xyz]mm[0-9]|%st\b|%mm[0-7]|[[:space:]](fwait|popcnt|xrstor[a-z0-9]*|cmpxchg16b|int3)\b'
if "$OBJDUMP" -d "$tmp/test-guest.elf" | grep -qE "$bad_insn"; then
	echo "build-test-guest: image contains SSE/x87/MMX or emulator-hostile instructions:" >&2
	"$OBJDUMP" -d "$tmp/test-guest.elf" | grep -E "$bad_insn" | head >&2
	exit 1
fi

mv -f "$tmp/test-guest.elf" "$out/test-guest.elf"
echo "$out/test-guest.elf (PVH entry 0x${entry#0000000000})"
