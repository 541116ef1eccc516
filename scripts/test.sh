#!/usr/bin/env bash
# The test command (CI runs exactly this): set up, check formatting and lints, run every
# test with nextest. Ends with nextest's summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Each phase's wall time, printed before the tests start (where CI's 30 minutes go).
phases=""
phase_start=$SECONDS
phase_done() {
	phases+="$1 $((SECONDS - phase_start)) s, "
	phase_start=$SECONDS
}
source scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "setup: installing cargo-nextest" >&2
	cargo install --locked --quiet cargo-nextest
fi
phase_done setup
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
phase_done lint
cargo build --workspace --all-targets --quiet
phase_done build
# Benchmarks in quick mode (a few minutes): only that they run and write their files. Bounded
# in time, and reported loudly rather than failing the test run: figures are not assertions.
if ! timeout 600 python3 bench/run.py --quick; then
	echo "!!! bench/run.py --quick FAILED or timed out (exit $?): see its output above !!!" >&2
fi
phase_done bench
# Every fuzz target for a few seconds from its committed seeds (scripts/fuzz.sh, docs/testing.md);
# a crash, leak or hang fails the run here. FABVM_FUZZ_SECONDS=0 skips it.
fuzz_seconds="${FABVM_FUZZ_SECONDS:-10}"
if [ "$fuzz_seconds" != 0 ]; then
	bash scripts/fuzz.sh "$fuzz_seconds"
fi
phase_done fuzz
echo "test.sh: ${phases%, } before the tests" >&2
exec cargo nextest run --workspace --no-fail-fast
