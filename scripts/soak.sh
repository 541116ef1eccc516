#!/usr/bin/env bash
# Load and chaos soak: the checks of tests/tests/soak.rs with TRIALS trials each (default
# 100; the test run uses 5), then a table of what ran and what was lost.
#   scripts/soak.sh [TRIALS] [SEED]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
trials="${1:-100}"
seed="${2:-$(date +%s)}"
log="$(mktemp /tmp/fabvm-soak.XXXXXX)"
echo "soak: $trials trials per check, FABVM_SOAK_SEED=$seed, log $log" >&2
FABVM_SOAK_TRIALS="$trials" FABVM_SOAK_SEED="$seed" \
	cargo nextest run -p fabvm-tests --test soak --no-fail-fast --no-capture 2>&1 | tee "$log" >&2
echo
echo "| check | figures |"
echo "|---|---|"
grep -o '^soak: .*' "$log" | sed -E 's/^soak: ([^ ]+) (.*)$/| \1 | \2 |/'
