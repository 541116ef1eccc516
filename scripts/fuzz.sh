#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/ for SECONDS each (default 15) from its committed
# seed corpus (fuzz/seeds/<target>/, copied to a temporary directory so the repository does
# not grow), then prints one line per target: executions, coverage, corpus, result.
# Exits non-zero if any target crashes, leaks, times out or fails to build; crash inputs are
# kept in fuzz/artifacts/<target>/ (ignored by git) with the command that replays them.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo fuzz needs nightly flags (-Zsanitizer=address); the toolchain here is stable, so
# RUSTC_BOOTSTRAP=1 lets stable rustc take them. Targets run one per core at a time
# (FABVM_FUZZ_JOBS overrides). As root, each run gets a private tmpfs as
# its TMPDIR (a mount namespace of its own, gone when it exits): the store target syncs
# files, which costs milliseconds on a disk and nothing on tmpfs (about 30x the executions).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-15}"
shift || true
cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz" >&2
	cargo install --locked --quiet cargo-fuzz
fi
if [ "$#" -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <(cargo fuzz list)
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/fabvm-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fuzz: building ${#targets[@]} targets (release, ASan, debug assertions)" >&2
if ! cargo fuzz build >"$work/build.log" 2>&1; then
	cat "$work/build.log" >&2
	echo "!!! fuzz: cargo fuzz build FAILED !!!" >&2
	exit 1
fi
private_tmp=0
if [ "$(id -u)" = 0 ] && unshare -m --propagation private true 2>/dev/null; then
	private_tmp=1
else
	echo "fuzz: not root or no unshare: temporary files go to $work (slower store target)" >&2
fi

# Runs "$@" with TMPDIR on a private tmpfs when we can make one.
with_tmp() {
	mkdir -p "$work/tmp"
	if [ "$private_tmp" = 1 ]; then
		unshare -m --propagation private sh -c \
			'mount -t tmpfs -o size=2g fabvm-fuzz "$0" && exec env TMPDIR="$0" "$@"' \
			"$work/tmp" "$@"
	else
		TMPDIR="$work/tmp" "$@"
	fi
}

# Fuzzes target $1; writes its summary line to $work/$1.summary, and $work/$1.failed if it
# failed.
run_target() {
	local t="$1"
	local corpus="$work/corpus/$t" artifacts="$work/artifacts/$t" log="$work/$t.log"
	mkdir -p "$corpus" "$artifacts"
	if [ -d "seeds/$t" ]; then
		cp seeds/"$t"/* "$corpus"/
	fi
	local seeds status=0 result done_line execs cov ft corp
	seeds=$(find "$corpus" -type f | wc -l)
	with_tmp cargo fuzz run "$t" "$corpus" -- \
		-max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
		-artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
	done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
	ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
	corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$done_line")
	if [ "$status" = 0 ]; then
		result=ok
	else
		result="FAILED (exit $status)"
		touch "$work/$t.failed"
		{
			echo "!!! fuzz: $t FAILED; the end of its log:"
			tail -40 "$log"
			if compgen -G "$artifacts/*" >/dev/null; then
				mkdir -p "artifacts/$t"
				cp "$artifacts"/* "artifacts/$t/"
				for a in "$artifacts"/*; do
					echo "!!! replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t artifacts/$t/$(basename "$a"))"
				done
			fi
		} >&2
	fi
	printf '%-20s %6s seeds %10s execs  cov %6s  ft %6s  corpus %-12s %s\n' \
		"$t" "$seeds" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result" >"$work/$t.summary"
}

# One target per core at a time (each libFuzzer run is one thread).
jobs="${FABVM_FUZZ_JOBS:-$(nproc)}"
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, $jobs at a time" >&2
running=0
for t in "${targets[@]}"; do
	if [ "$running" -ge "$jobs" ]; then
		wait -n || true
		running=$((running - 1))
	fi
	run_target "$t" &
	running=$((running + 1))
done
wait

failed=()
for t in "${targets[@]}"; do
	cat "$work/$t.summary" >&2
	if [ -e "$work/$t.failed" ]; then
		failed+=("$t")
	fi
done
if [ "${#failed[@]}" -gt 0 ]; then
	echo "!!! fuzz: ${#failed[@]} target(s) FAILED: ${failed[*]} !!!" >&2
	exit 1
fi
