#!/usr/bin/env bash
# Build fabvm's Debian guest: kernel (bzImage + extracted ELF vmlinux), a
# small busybox initramfs carrying the virtio modules, and an ext4 root image
# with a busybox userland for it to mount from virtio-blk.
#
#   guest-images/debian-kernel.sh [--locked] [--update-lock] [OUTDIR]
#
# OUTDIR (default guest-images/out/debian) receives vmlinuz, vmlinux,
# initramfs.cpio.gz, root.ext4, config, VERSION and SHA256SUMS. Packages are cached in
# $FABVM_CACHE_DIR (default guest-images/out/cache). See guest-images/README.md,
# section "Debian kernel and initramfs".
set -euo pipefail
shopt -s inherit_errexit
umask 022
export LC_ALL=C
export PATH=$PATH:/usr/sbin:/sbin # mkfs.ext4, debugfs, e2fsck live there

PROG=debian-kernel.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
INITRAMFS_SRC=$SCRIPT_DIR/initramfs
ROOTFS_SRC=$SCRIPT_DIR/rootfs
# The root image: size, label (what the initramfs's fabvm.root=auto looks for),
# and fixed UUID and directory hash seed, so that the same inputs give the same bytes.
ROOT_SIZE=32M
ROOT_LABEL=fabvm-root
ROOT_UUID=6fab0000-0000-4000-8000-000000000001
ROOT_HASH_SEED=6fab0000-0000-4000-8000-000000000002
LOCK_FILE=$SCRIPT_DIR/debian-kernel.lock
META=${FABVM_DEBIAN_KERNEL_META:-linux-image-cloud-amd64}
BUSYBOX_PKG=busybox-static
ARCH=amd64

die() { echo "$PROG: error: $*" >&2; exit 1; }
warn() { echo "$PROG: WARNING: $*" >&2; }
info() { echo "$PROG: $*"; }
is_root() { [ "$(id -u)" = 0 ]; }

usage() {
	cat <<EOF
usage: $PROG [--locked] [--update-lock] [OUTDIR]
  OUTDIR         output directory (default: guest-images/out/debian)
  --locked       build exactly the kernel and busybox recorded in
                 debian-kernel.lock (from the cache, or the archive if it still
                 serves them); fail if that is impossible
  --update-lock  after a successful build, record the packages used in
                 debian-kernel.lock
env: FABVM_CACHE_DIR (default guest-images/out/cache),
     FABVM_DEBIAN_KERNEL_META (default linux-image-cloud-amd64)
EOF
}

OUTDIR=""
LOCKED=0
UPDATE_LOCK=0
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help) usage; exit 0 ;;
	--locked) LOCKED=1 ;;
	--update-lock) UPDATE_LOCK=1 ;;
	-*) die "unknown option '$1' (try --help)" ;;
	*) [ -z "$OUTDIR" ] || die "more than one OUTDIR given"; OUTDIR=$1 ;;
	esac
	shift
done
OUTDIR=${OUTDIR:-$SCRIPT_DIR/out/debian}
CACHE=${FABVM_CACHE_DIR:-$SCRIPT_DIR/out/cache}
mkdir -p "$OUTDIR" "$CACHE" || die "cannot create '$OUTDIR' or '$CACHE'"
OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE=$(cd "$CACHE" && pwd)

# ---------------------------------------------------------------- host tools
export DEBIAN_FRONTEND=noninteractive
command -v apt-get >/dev/null && command -v apt-cache >/dev/null && command -v dpkg >/dev/null ||
	die "needs a Debian host with apt-get, apt-cache and dpkg"
[ "$(dpkg --print-architecture)" = "$ARCH" ] || die "needs an $ARCH Debian host (this is $(dpkg --print-architecture))"

APT_UPDATED=0
apt_update_once() { # returns 1 if an update is not possible (done already, or not root)
	[ "$APT_UPDATED" = 0 ] && is_root || return 1
	APT_UPDATED=1
	info "apt-get update"
	apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
}

ensure_tool() { # command package
	command -v "$1" >/dev/null && return 0
	is_root || die "'$1' not found: install Debian package '$2' (or run as root to have it installed)"
	info "installing $2"
	if ! apt-get install -y -qq --no-install-recommends "$2" </dev/null >/dev/null; then
		apt_update_once && apt-get install -y -qq --no-install-recommends "$2" </dev/null >/dev/null ||
			die "could not install Debian package '$2'"
	fi
	command -v "$1" >/dev/null || die "'$1' still missing after installing '$2'"
}
# e2fsprogs early: its version is one of the inputs of the root image.
for t in sha256sum:coreutils od:coreutils dd:coreutils flock:util-linux mke2fs:e2fsprogs mkfs.ext4:e2fsprogs debugfs:e2fsprogs; do
	ensure_tool "${t%%:*}" "${t#*:}"
done

# Serialise runs sharing a cache (outputs are written atomically per file).
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "timed out waiting for another $PROG run (lock $CACHE/.lock)"

# ------------------------------------------------------------ apt resolution
# apt-cache takes about a second per call when apt's binary cache is disabled
# (as in Debian's container images): ask for several packages at once, and
# keep a binary cache of our own in $CACHE (apt rebuilds it when the lists change).
APT_RECS=""
APT_ERR=""
apt_show() { # package[=version]... -> candidate records in APT_RECS
	local err=$CACHE/.apt-cache.err
	APT_RECS=$(apt-cache -o Dir::Cache::pkgcache="$CACHE/apt-pkgcache.bin" show --no-all-versions "$@" 2>/dev/null ||
		apt-cache show --no-all-versions "$@" 2>"$err" || true)
	APT_ERR=$(grep -m 1 '^E:' "$err" 2>/dev/null || true)
	rm -f "$err"
}
rec_of() { # package -> its first record in APT_RECS
	printf '%s\n' "$APT_RECS" | awk -v RS= -v want="Package: $1" '
		{ n = split($0, l, "\n"); for (i = 1; i <= n; i++) if (l[i] == want) { print; exit } }'
}
field() { # record field
	printf '%s\n' "$1" | sed -n "s/^$2: //p" | head -n 1
}

# Sets K_PKG K_VER K_SHA (kernel) and B_VER B_SHA (busybox) from the apt index.
resolve_archive() {
	local rec deps brec
	apt_show "$META" "$BUSYBOX_PKG" ${L_PKG:+"$L_PKG"}
	rec=$(rec_of "$META")
	if [ -z "$rec" ] && apt_update_once; then
		apt_show "$META" "$BUSYBOX_PKG" ${L_PKG:+"$L_PKG"}
		rec=$(rec_of "$META")
	fi
	[ -z "$rec" ] && [ -n "$APT_ERR" ] && die "apt-cache failed: $APT_ERR"
	[ -n "$rec" ] || die "package '$META' is not in the apt index (Debian main for $ARCH needed; run as root to apt-get update)"
	brec=$(rec_of "$BUSYBOX_PKG")
	[ -n "$brec" ] || die "package '$BUSYBOX_PKG' is not in the apt index"
	B_VER=$(field "$brec" Version)
	B_SHA=$(field "$brec" SHA256)
	[ -n "$B_VER" ] && [ -n "$B_SHA" ] || die "apt index has no Version/SHA256 for '$BUSYBOX_PKG'"
	deps=$(field "$rec" Depends)
	K_PKG=$(printf '%s\n' "$deps" | tr ',|' '\n\n' | sed 's/^ *//; s/ .*//' | grep -E '^linux-image-[0-9]' | head -n 1) ||
		die "could not resolve '$META' to a versioned linux-image package (Depends: $deps)"
	rec=$(rec_of "$K_PKG")
	if [ -z "$rec" ]; then
		apt_show "$K_PKG"
		rec=$(rec_of "$K_PKG")
	fi
	[ -n "$rec" ] || die "'$META' depends on '$K_PKG', which is not in the apt index"
	K_VER=$(field "$rec" Version)
	K_SHA=$(field "$rec" SHA256)
	[ -n "$K_VER" ] && [ -n "$K_SHA" ] || die "apt index has no Version/SHA256 for '$K_PKG'"
}

lock_get() { # key -> value from the lock file (never sourced)
	[ -r "$LOCK_FILE" ] && sed -n "s/^$1=//p" "$LOCK_FILE" | head -n 1 || true
}
L_PKG=$(lock_get package)
L_VER=$(lock_get version)
L_SHA=$(lock_get sha256)
L_BVER=$(lock_get busybox_version)
L_BSHA=$(lock_get busybox_sha256)

# check_pin label pkg ver sha lock_pkg lock_ver lock_sha -> prints matches|differs|none
check_pin() {
	if [ -z "$5" ] || [ -z "$6" ] || [ -z "$7" ]; then
		echo none
	elif [ "$2" = "$5" ] && [ "$3" = "$6" ]; then
		[ "$4" = "$7" ] || die "$1: the archive serves $2 $3 with SHA256 $4, but debian-kernel.lock records $7 for that version"
		echo matches
	else
		echo differs
	fi
}

if [ "$LOCKED" = 1 ]; then
	[ -n "$L_PKG" ] && [ -n "$L_VER" ] && [ -n "$L_SHA" ] && [ -n "$L_BVER" ] && [ -n "$L_BSHA" ] ||
		die "--locked: $LOCK_FILE is missing or incomplete"
	K_PKG=$L_PKG K_VER=$L_VER K_SHA=$L_SHA B_VER=$L_BVER B_SHA=$L_BSHA
	# The index, if it still lists these versions, must agree with the lock.
	apt_show "$K_PKG=$K_VER" "$BUSYBOX_PKG=$B_VER"
	rec=$(rec_of "$K_PKG")
	[ -z "$rec" ] || [ "$(field "$rec" SHA256)" = "$K_SHA" ] ||
		die "apt index SHA256 for $K_PKG $K_VER differs from debian-kernel.lock"
	rec=$(rec_of "$BUSYBOX_PKG")
	[ -z "$rec" ] || [ "$(field "$rec" SHA256)" = "$B_SHA" ] ||
		die "apt index SHA256 for $BUSYBOX_PKG $B_VER differs from debian-kernel.lock"
	K_PIN=matches B_PIN=matches
else
	resolve_archive
	K_PIN=$(check_pin kernel "$K_PKG" "$K_VER" "$K_SHA" "$L_PKG" "$L_VER" "$L_SHA")
	B_PIN=$(check_pin busybox "$BUSYBOX_PKG" "$B_VER" "$B_SHA" "$BUSYBOX_PKG" "$L_BVER" "$L_BSHA")
	# An index older than the lock is stale: refresh it once and look again.
	if { [ "$K_PIN" = differs ] && dpkg --compare-versions "$K_VER" lt "$L_VER"; } ||
		{ [ "$B_PIN" = differs ] && dpkg --compare-versions "$B_VER" lt "$L_BVER"; }; then
		if apt_update_once; then
			resolve_archive
			K_PIN=$(check_pin kernel "$K_PKG" "$K_VER" "$K_SHA" "$L_PKG" "$L_VER" "$L_SHA")
			B_PIN=$(check_pin busybox "$BUSYBOX_PKG" "$B_VER" "$B_SHA" "$BUSYBOX_PKG" "$L_BVER" "$L_BSHA")
		fi
	fi
fi

pin_warnings() {
	if [ "$K_PIN" = none ]; then
		warn "no kernel recorded in $LOCK_FILE; using $K_PKG $K_VER (record it with --update-lock)"
	elif [ "$K_PIN" = differs ]; then
		warn "the archive serves $K_PKG $K_VER, debian-kernel.lock has $L_PKG $L_VER (Debian keeps only the current version)."
		warn "building with $K_PKG $K_VER; the version actually used is in $OUTDIR/VERSION. Update the lock with: $PROG --update-lock"
	fi
	if [ "$B_PIN" = none ]; then
		warn "no busybox recorded in $LOCK_FILE; using $BUSYBOX_PKG $B_VER (record it with --update-lock)"
	elif [ "$B_PIN" = differs ]; then
		warn "the archive serves $BUSYBOX_PKG $B_VER, debian-kernel.lock has $L_BVER. Building with $B_VER; update the lock with: $PROG --update-lock"
	fi
}

write_lock() {
	local tmp=$LOCK_FILE.tmp.$$
	cat >"$tmp" <<EOF
# Packages last used by guest-images/debian-kernel.sh (update with --update-lock).
# Debian keeps only the current version: a newer one is used with a warning;
# the same version with a different SHA256 is an error.
metapackage=$META
package=$K_PKG
version=$K_VER
sha256=$K_SHA
busybox_package=$BUSYBOX_PKG
busybox_version=$B_VER
busybox_sha256=$B_SHA
EOF
	mv "$tmp" "$LOCK_FILE"
	info "recorded $K_PKG $K_VER and $BUSYBOX_PKG $B_VER in $LOCK_FILE"
}

# ------------------------------------------------------------------ summary
vget() { sed -n "s/^$1=//p" "$OUTDIR/VERSION" | head -n 1; }
summary() {
	local f
	echo "---- fabvm Debian guest: $OUTDIR"
	echo "kernel    $(vget package) $(vget version) (release $(vget kernel_release))"
	echo "busybox   $(vget busybox_package) $(vget busybox_version)"
	echo "bzImage   payload $(vget kernel_compression); vmlinux PVH entry $(vget pvh_entry)"
	echo "modules   $(vget initramfs_modules)"
	echo "root      ext4 $(vget root_size), label $(vget root_label)"
	case "$K_PIN/$B_PIN" in
	matches/matches) echo "lock      matches debian-kernel.lock" ;;
	*) echo "lock      kernel: $K_PIN, busybox: $B_PIN (see warnings; record with --update-lock)" ;;
	esac
	for f in vmlinuz vmlinux initramfs.cpio.gz root.ext4 config; do
		printf '%-18s %10s bytes\n' "$f" "$(stat -c %s "$OUTDIR/$f")"
	done
}

outputs_valid() {
	[ -f "$OUTDIR/SHA256SUMS" ] && [ -f "$OUTDIR/VERSION" ] || return 1
	[ "$(vget build_inputs)" = "$INPUTS" ] || return 1
	(cd "$OUTDIR" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1)
}

# Everything the outputs depend on; unchanged inputs + verified outputs = done.
compute_inputs() {
	{
		echo "kernel $K_PKG $K_VER $K_SHA busybox $B_VER $B_SHA root $(is_root && echo 1 || echo 0)"
		cd "$SCRIPT_DIR" && sha256sum "$(basename "$SCRIPT_PATH")"
		cd "$INITRAMFS_SRC" && find . -type f -print0 | sort -z | xargs -0 sha256sum
		cd "$ROOTFS_SRC" && find . -type f -print0 | sort -z | xargs -0 sha256sum
		mke2fs -V 2>&1 | sed -n 1p # (head would SIGPIPE mke2fs under pipefail)
	} | sha256sum | cut -d' ' -f1
}
INPUTS=$(compute_inputs)

pin_warnings
if outputs_valid; then
	info "up to date ($K_PKG $K_VER), outputs match SHA256SUMS"
	if [ "$UPDATE_LOCK" = 1 ]; then write_lock; K_PIN=matches B_PIN=matches; fi
	summary
	exit 0
fi

# ------------------------------------------------------------------ download
deb_path() { # pkg version
	echo "$CACHE/${1}_${2//:/%3a}_$ARCH.deb"
}
fetch_deb() { # pkg version sha256; sets FETCH_FAILED=1 if the download failed (dies on bad data)
	local pkg=$1 ver=$2 sha=$3 dst dl got
	dst=$(deb_path "$pkg" "$ver")
	if [ -f "$dst" ]; then
		[ "$(sha256sum "$dst" | cut -d' ' -f1)" != "$sha" ] || return 0
		warn "cached $(basename "$dst") has a wrong SHA256; downloading it again"
		rm -f "$dst"
	fi
	dl=$(mktemp -d "$CACHE/.dl.XXXXXX")
	info "downloading $pkg $ver"
	local opts=(-q)
	if is_root; then opts+=(-o APT::Sandbox::User=root); fi
	if ! (cd "$dl" && apt-get download "${opts[@]}" "$pkg=$ver" </dev/null >/dev/null); then
		rm -rf "$dl"
		FETCH_FAILED=1
		return 0
	fi
	set -- "$dl"/*.deb
	[ $# = 1 ] && [ -f "$1" ] || { rm -rf "$dl"; die "apt-get download $pkg=$ver produced no single .deb"; }
	got=$(sha256sum "$1" | cut -d' ' -f1)
	[ "$got" = "$sha" ] || { rm -rf "$dl"; die "$pkg $ver: downloaded .deb has SHA256 $got, expected $sha"; }
	mv "$1" "$dst"
	rm -rf "$dl"
}

FETCH_FAILED=0
fetch_deb "$K_PKG" "$K_VER" "$K_SHA"
fetch_deb "$BUSYBOX_PKG" "$B_VER" "$B_SHA"
if [ "$FETCH_FAILED" = 1 ]; then
	# A stale index names versions the archive no longer has: refresh once.
	if [ "$LOCKED" = 1 ]; then
		die "could not download $K_PKG $K_VER / $BUSYBOX_PKG $B_VER (--locked: is that version still in the archive or the cache?)"
	fi
	apt_update_once || die "could not download $K_PKG $K_VER / $BUSYBOX_PKG $B_VER (run as root to refresh the apt index)"
	resolve_archive
	K_PIN=$(check_pin kernel "$K_PKG" "$K_VER" "$K_SHA" "$L_PKG" "$L_VER" "$L_SHA")
	B_PIN=$(check_pin busybox "$BUSYBOX_PKG" "$B_VER" "$B_SHA" "$BUSYBOX_PKG" "$L_BVER" "$L_BSHA")
	pin_warnings
	FETCH_FAILED=0
	fetch_deb "$K_PKG" "$K_VER" "$K_SHA"
	fetch_deb "$BUSYBOX_PKG" "$B_VER" "$B_SHA"
	[ "$FETCH_FAILED" = 0 ] || die "could not download $K_PKG $K_VER / $BUSYBOX_PKG $B_VER from the archive"
	INPUTS=$(compute_inputs)
fi

for t in readelf:binutils objcopy:binutils cpio:cpio gzip:gzip; do
	ensure_tool "${t%%:*}" "${t#*:}"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fabvm-debian-kernel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
info "extracting $K_PKG $K_VER"
dpkg -x "$(deb_path "$K_PKG" "$K_VER")" "$WORK/kernel"
dpkg -x "$(deb_path "$BUSYBOX_PKG" "$B_VER")" "$WORK/busybox"

set -- "$WORK"/kernel/boot/vmlinuz-*
[ $# = 1 ] && [ -f "$1" ] || die "$K_PKG has no single /boot/vmlinuz-*"
BZIMAGE=$1
KREL=${BZIMAGE##*/vmlinuz-}
KCONFIG=$WORK/kernel/boot/config-$KREL
[ -f "$KCONFIG" ] || die "$K_PKG has no /boot/config-$KREL"
MODDIR=""
for d in "$WORK/kernel/lib/modules/$KREL" "$WORK/kernel/usr/lib/modules/$KREL"; do
	[ -d "$d" ] && MODDIR=$d && break
done
[ -n "$MODDIR" ] || die "$K_PKG has no lib/modules/$KREL"
BUSYBOX=""
for b in "$WORK/busybox/bin/busybox" "$WORK/busybox/usr/bin/busybox"; do
	[ -f "$b" ] && BUSYBOX=$b && break
done
[ -n "$BUSYBOX" ] || die "$BUSYBOX_PKG has no bin/busybox"
[ "$(readelf -lW "$BUSYBOX" | grep -c INTERP || true)" = 0 ] || die "$BUSYBOX_PKG's busybox is not statically linked"

NEW=$(mktemp -d "$OUTDIR/.new.XXXXXX")
trap 'rm -rf "$WORK" "$NEW"' EXIT

# ------------------------------------------------------ vmlinux from bzImage
u() { # file offset bytes(1|2|4|8) -> unsigned little-endian integer
	od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' \n'
}
extract_vmlinux() { # bzImage out
	local bz=$1 out=$2 size sects ver poff plen start magic comp tool pkg cmd strip expect got
	size=$(stat -c %s "$bz")
	[ "$(u "$bz" 510 2)" = 43605 ] && [ "$(od -An -c -j 514 -N 4 "$bz" | tr -d ' ')" = HdrS ] ||
		die "$(basename "$bz") is not a bzImage (no boot flag / HdrS)"
	ver=$(u "$bz" 518 2)
	[ "$ver" -ge $((0x208)) ] || die "boot protocol $(printf %x "$ver") < 2.08: no payload_offset field"
	sects=$(u "$bz" $((0x1f1)) 1)
	[ "$sects" != 0 ] || sects=4
	poff=$(u "$bz" $((0x248)) 4)
	plen=$(u "$bz" $((0x24c)) 4)
	start=$(((sects + 1) * 512 + poff))
	[ $((start + plen)) -le "$size" ] && [ "$plen" -gt 8 ] || die "bzImage payload (offset $start, length $plen) lies outside the file"
	magic=$(od -An -tx1 -j "$start" -N 6 "$bz" | tr -d ' \n')
	strip=4 # every format but gzip is followed by the le32 uncompressed size
	case "$magic" in
	1f8b*) comp=gzip tool=gzip pkg=gzip cmd="gzip -dc" strip=0 ;; # its trailer ends in that size
	fd377a585a00) comp=xz tool=xz pkg=xz-utils cmd="xz -dc --single-stream" ;;
	5d0000*) comp=lzma tool=xz pkg=xz-utils cmd="xz -dc --format=lzma" ;;
	425a68*) comp=bzip2 tool=bzip2 pkg=bzip2 cmd="bzip2 -dc" ;;
	894c5a4f*) comp=lzo tool=lzop pkg=lzop cmd="lzop -dc" ;;
	02214c18*) comp=lz4 tool=lz4 pkg=lz4 cmd="lz4 -dc" ;;
	28b52ffd*) comp=zstd tool=zstd pkg=zstd cmd="zstd -dc -q" ;;
	*) die "unknown compression magic '$magic' at bzImage payload offset $start" ;;
	esac
	ensure_tool "$tool" "$pkg"
	expect=$(u "$bz" $((start + plen - 4)) 4)
	info "bzImage payload: $comp, $plen bytes at offset $start, decompressing"
	dd if="$bz" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=$((plen - strip)) status=none |
		$cmd >"$out.full" 2>"$WORK/decompress.err" ||
		die "$comp decompression of the bzImage payload failed: $(head -c 300 "$WORK/decompress.err")"
	got=$(stat -c %s "$out.full")
	[ "$got" = "$expect" ] || die "decompressed payload is $got bytes, the bzImage says $expect"
	# The payload is the stripped ELF vmlinux followed by relocation data the
	# decompressor uses (CONFIG_X86_NEED_RELOCS); cut the file at the ELF's end.
	[ "$(od -An -tx1 -N 4 "$out.full" | tr -d ' \n')" = 7f454c46 ] ||
		die "bzImage payload is not an ELF file"
	[ "$(u "$out.full" 4 1)" = 2 ] && [ "$(u "$out.full" 18 2)" = 62 ] ||
		die "bzImage payload is not a 64-bit x86-64 ELF"
	local shoff shentsize shnum end
	shoff=$(u "$out.full" 40 8)
	shentsize=$(u "$out.full" 58 2)
	shnum=$(u "$out.full" 60 2)
	end=$((shoff + shentsize * shnum))
	while read -r o fs; do
		[ $((o + fs)) -le "$end" ] || end=$((o + fs))
	done < <(readelf -lW "$out.full" | awk '$1 == "LOAD" || $1 == "NOTE" { print $2, $5 }' | while read -r a b; do echo $((a)) $((b)); done)
	[ "$end" -le "$got" ] || die "ELF in the bzImage payload is truncated (needs $end bytes, has $got)"
	head -c "$end" "$out.full" >"$out"
	rm -f "$out.full"
	KCOMP=$comp
}
extract_vmlinux "$BZIMAGE" "$NEW/vmlinux"

# PVH entry: Xen ELF note type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
readelf -nW "$NEW/vmlinux" >"$WORK/notes" 2>&1 || die "readelf -n failed on vmlinux"
# (readelf -W puts the description on the note's line, without -W on the next.)
PVH_ENTRY=$(awk '
	function entry(s, b) {
		sub(/.*description data: */, "", s)
		split(s, b, " ")
		printf "0x%s%s%s%s\n", b[4], b[3], b[2], b[1]
		exit
	}
	want && /description data:/ { entry($0) }
	{ want = 0 }
	/^ *Xen / && /\(0x0*12\)/ { if (/description data:/) entry($0); want = 1 }' "$WORK/notes")
[ -n "$PVH_ENTRY" ] || die "vmlinux has no PVH entry note (Xen note type 0x12); is CONFIG_PVH set?"
PVH_ENTRY=$(printf '0x%x' "$PVH_ENTRY")
grep -q '^CONFIG_PVH=y' "$KCONFIG" || warn "kernel config does not say CONFIG_PVH=y, yet the PVH note is present"
info "vmlinux: $(stat -c %s "$NEW/vmlinux") bytes, PVH entry $PVH_ENTRY"

# ---------------------------------------------------------------- initramfs
# A busybox userland in DIR: the usual directories, /bin/busybox and a symlink per applet.
stage_busybox() { # dir
	local dir=$1 a
	[ -n "$dir" ] || die "stage_busybox: no directory"
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,etc}
	chmod 1777 "$dir/tmp"
	chmod 0700 "$dir/root"
	install -m 0755 "$BUSYBOX" "$dir/bin/busybox"
	while read -r a; do
		case "$a" in */*) ;; *) continue ;; esac # skip /linuxrc
		[ "$a" = bin/busybox ] || [ -L "$dir/$a" ] || [ -e "$dir/$a" ] || ln -s /bin/busybox "$dir/$a"
	done < <("$dir/bin/busybox" --list-full)
	# The applets the two init scripts use.
	for a in sh insmod switch_root mount findfs ip ping poweroff setsid cttyhack readlink; do
		[ -L "$dir/bin/$a" ] || [ -L "$dir/sbin/$a" ] || [ -L "$dir/usr/bin/$a" ] || [ -L "$dir/usr/sbin/$a" ] ||
			die "busybox lacks the '$a' applet"
	done
}
STAGE=$WORK/initramfs
info "building initramfs"
stage_busybox "$STAGE"
install -m 0755 "$INITRAMFS_SRC/init" "$STAGE/init"
install -m 0644 "$INITRAMFS_SRC/modules" "$STAGE/etc/fabvm-modules"
if is_root; then
	mknod -m 0600 "$STAGE/dev/console" c 5 1
	mknod -m 0666 "$STAGE/dev/null" c 1 3
fi

# Modules: the listed ones plus their dependencies (.modinfo "depends="),
# decompressed, at their usual paths, with a modules.dep for them.
SMOD=$STAGE/lib/modules/$KREL
mkdir -p "$SMOD"
find "$MODDIR" -type f \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -printf '%P\n' |
	awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n); print n, $0 }' >"$WORK/modindex"
declare -A MPATH=() MDEPS=()
BUILTIN=()
queue=()
while read -r m _; do
	case "$m" in "" | "#"*) continue ;; esac
	queue+=("${m//-/_}")
done <"$INITRAMFS_SRC/modules"
WANTED=("${queue[@]}")
while [ ${#queue[@]} -gt 0 ]; do
	m=${queue[0]}
	queue=("${queue[@]:1}")
	[ -z "${MPATH[$m]+x}" ] || continue
	rel=$(awk -v n="$m" '$1 == n { print $2; exit }' "$WORK/modindex")
	if [ -z "$rel" ]; then
		if [ -f "$MODDIR/modules.builtin" ] &&
			awk -v n="$m" '{ sub(/.*\//, ""); sub(/\.ko$/, ""); gsub(/-/, "_"); if ($0 == n) f = 1 } END { exit !f }' "$MODDIR/modules.builtin"; then
			BUILTIN+=("$m")
			MPATH[$m]=builtin
			continue
		fi
		die "module '$m' (from initramfs/modules or a dependency) is neither in $K_PKG nor built in"
	fi
	dst=${rel%.xz}
	dst=${dst%.zst}
	dst=${dst%.gz}
	mkdir -p "$(dirname "$SMOD/$dst")"
	case "$rel" in
	*.xz) ensure_tool xz xz-utils; xz -dc "$MODDIR/$rel" >"$SMOD/$dst" ;;
	*.zst) ensure_tool zstd zstd; zstd -dc -q "$MODDIR/$rel" >"$SMOD/$dst" ;;
	*.gz) gzip -dc "$MODDIR/$rel" >"$SMOD/$dst" ;;
	*) cp "$MODDIR/$rel" "$SMOD/$dst" ;;
	esac
	chmod 0644 "$SMOD/$dst"
	MPATH[$m]=$dst
	objcopy -O binary -j .modinfo "$SMOD/$dst" "$WORK/modinfo" || die "cannot read .modinfo of $dst"
	deps=$(tr '\0' '\n' <"$WORK/modinfo" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
	MDEPS[$m]=$deps
	for d in $deps; do queue+=("${d//-/_}"); done
done

# Load order (dependencies first), depth-first; a cycle is an error.
topo() { # out-array-name state-assoc-name module
	local -n _out=$1 _state=$2
	local m=$3 d
	[ "${MPATH[$m]:-}" != builtin ] || return 0
	case "${_state[$m]:-}" in done) return 0 ;; active) die "module dependency cycle at '$m'" ;; esac
	_state[$m]="active"
	for d in ${MDEPS[$m]}; do topo "$1" "$2" "${d//-/_}"; done
	_state[$m]="done"
	_out+=("$m")
}
# shellcheck disable=SC2034 # used through topo's nameref
declare -A STATE=()
ORDER=()
for m in "${WANTED[@]}"; do topo ORDER STATE "$m"; done
# modules.dep in depmod's format: every dependency, the one to load first last.
for m in "${ORDER[@]}"; do
	# shellcheck disable=SC2034 # used through topo's nameref
	declare -A ST=()
	SUB=()
	topo SUB ST "$m"
	line="${MPATH[$m]}:"
	for ((i = ${#SUB[@]} - 2; i >= 0; i--)); do line+=" ${MPATH[${SUB[$i]}]}"; done
	echo "$line"
	unset ST
done | sort >"$SMOD/modules.dep"
if [ ${#BUILTIN[@]} -gt 0 ] && [ -f "$MODDIR/modules.builtin" ]; then
	for m in "${BUILTIN[@]}"; do
		awk -v n="$m" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko$/, "", b); gsub(/-/, "_", b); if (b == n) print }' "$MODDIR/modules.builtin"
	done >"$SMOD/modules.builtin"
fi

# Reproducible archive: sorted names, root-owned, fixed times, gzip -n.
find "$STAGE" -exec touch -h -d @0 {} +
(cd "$STAGE" && find . -mindepth 1 -printf '%P\n' | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
	gzip -9 -n >"$NEW/initramfs.cpio.gz"

# ---------------------------------------------------------------- root image
# ext4 made from a directory (mkfs.ext4 -d: no loop device, no mount). mkfs
# copies each file's ctime and owner from the staging directory, which touch
# cannot set: debugfs sets them to 0 afterwards, and E2FSPROGS_FAKE_TIME fixes
# the times mkfs and debugfs stamp themselves, so the same inputs give the same
# bytes (as root or not).
RSTAGE=$WORK/rootfs
info "building root.ext4"
stage_busybox "$RSTAGE"
mkdir -p "$RSTAGE/var/log" "$RSTAGE/lib/modules"
rm -f "$RSTAGE/sbin/init" # busybox's init applet: ours replaces it
install -m 0755 "$ROOTFS_SRC/init" "$RSTAGE/sbin/init"
printf '# fabvm root image (guest-images/debian-kernel.sh)\nkernel_release=%s\nbusybox_version=%s\n' \
	"$KREL" "$B_VER" >"$RSTAGE/etc/fabvm-root"
printf 'fabvm\n' >"$RSTAGE/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$RSTAGE/etc/passwd"
printf 'root:x:0:\n' >"$RSTAGE/etc/group"
find "$RSTAGE" -exec touch -h -d @0 {} +
mkfs_log=$WORK/mkfs.log
E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -t ext4 -L "$ROOT_LABEL" -U "$ROOT_UUID" \
	-E "hash_seed=$ROOT_HASH_SEED,root_owner=0:0" -d "$RSTAGE" "$NEW/root.ext4" "$ROOT_SIZE" \
	</dev/null >"$mkfs_log" 2>&1 || die "mkfs.ext4 -d failed: $(head -c 500 "$mkfs_log")"
(cd "$RSTAGE" && find . -mindepth 1 -printf '%P\n' | sort) |
	awk '{ for (k = 1; k <= 3; k++) print "set_inode_field /" $0 " " (k == 1 ? "ctime" : k == 2 ? "uid" : "gid") " 0" }' \
		>"$WORK/debugfs.cmds"
printf 'set_inode_field / ctime 0\n' >>"$WORK/debugfs.cmds"
E2FSPROGS_FAKE_TIME=1 debugfs -w -f "$WORK/debugfs.cmds" "$NEW/root.ext4" >"$WORK/debugfs.log" 2>&1 ||
	die "debugfs on root.ext4 failed: $(head -c 500 "$WORK/debugfs.log")"
# debugfs exits 0 even when a command fails: every line but the command echoes is an error.
if grep -v '^debugfs' "$WORK/debugfs.log" | grep -q .; then
	die "debugfs on root.ext4: $(grep -v '^debugfs' "$WORK/debugfs.log" | head -n 3 | tr '\n' ' ')"
fi
e2fsck -fn "$NEW/root.ext4" >"$WORK/fsck.log" 2>&1 ||
	die "root.ext4 fails e2fsck: $(tail -n 5 "$WORK/fsck.log" | tr '\n' ' ')"

cp "$BZIMAGE" "$NEW/vmlinuz"
cp "$KCONFIG" "$NEW/config"

# ------------------------------------------------------------------ publish
cat >"$NEW/VERSION" <<EOF
# What this directory was built from (guest-images/debian-kernel.sh).
metapackage=$META
package=$K_PKG
version=$K_VER
kernel_release=$KREL
deb_sha256=$K_SHA
busybox_package=$BUSYBOX_PKG
busybox_version=$B_VER
busybox_sha256=$B_SHA
kernel_compression=$KCOMP
pvh_entry=$PVH_ENTRY
initramfs_modules=${ORDER[*]}${BUILTIN[*]:+ (built in: ${BUILTIN[*]})}
root_size=$ROOT_SIZE
root_label=$ROOT_LABEL
root_uuid=$ROOT_UUID
build_inputs=$INPUTS
EOF
rm -f "$OUTDIR/SHA256SUMS" # invalidate first, so an interrupted publish is rebuilt
for f in vmlinuz vmlinux initramfs.cpio.gz root.ext4 config VERSION; do
	mv -f "$NEW/$f" "$OUTDIR/$f"
done
(cd "$OUTDIR" && sha256sum vmlinuz vmlinux initramfs.cpio.gz root.ext4 config VERSION >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
if [ "$UPDATE_LOCK" = 1 ]; then write_lock; K_PIN=matches B_PIN=matches; fi
[ "$K_PIN" != differs ] || warn "built with $K_PKG $K_VER, not the locked $L_PKG $L_VER; run '$PROG --update-lock' and commit guest-images/debian-kernel.lock"
info "done in ${SECONDS}s"
summary
