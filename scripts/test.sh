#!/usr/bin/env bash
# Installs what the tests need, builds cryopod and runs every test (unit
# tests and the end-to-end suites in tests/), then prints a summary.
# At most two tests run at once: the machine has two cores and each
# end-to-end test runs a fixture and cryopod side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release

mkdir -p target
log=target/test.log
set +e
cargo test --release --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^passed;?$/) s += $(i - 1) } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^failed;?$/) s += $(i - 1) } END { print s + 0 }' "$log")
skipped=$(grep -c '^skipped:' "$log" || true)
echo
echo "==================== summary ===================="
if [ "$failed" != 0 ]; then
	echo "failed tests:"
	grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^test /  /; s/ \.\.\. FAILED$//' | sort -u
fi
[ "$skipped" = 0 ] || { echo "skipped checks (see 'skipped:' lines above):"; grep '^skipped:' "$log" | sort -u | sed 's/^/  /'; }
echo "full log: $log"
echo "$passed passed, $failed failed"
exit "$status"
