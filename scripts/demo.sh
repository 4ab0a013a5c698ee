#!/usr/bin/env bash
# Shows cryopod at work on a small counter program, once built 64-bit and
# once built 32-bit: start it, dump it, look at the image, restore it, and
# check that the count goes on with no gap.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "Installing what is missing and building cryopod"
./scripts/setup.sh
cargo build --release -q
cryopod=${CARGO_TARGET_DIR:-$PWD/target}/release/cryopod
work=$PWD/target/demo
rm -rf "$work"
mkdir -p "$work"

# Starts a program in the background with only stdin/stdout/stderr open:
# whatever else this shell inherited (pipes, for one) cryopod cannot dump.
start_alone() {
	(
		for fd in /proc/$BASHPID/fd/*; do
			fd=${fd##*/}
			[ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
		done
		exec "$@" </dev/null >"$dir/log" 2>&1
	) &
}

restored_pid=""
cleanup() {
	for p in "${pid:-}" "$restored_pid"; do
		[ -z "$p" ] || kill -9 "$p" 2>/dev/null || true
	done
}
trap cleanup EXIT

for bits in 64 32; do
	dir=$work/m$bits
	mkdir -p "$dir"
	say "${bits}-bit: building the counter (tests/fixtures/counter.c, gcc -m$bits)"
	gcc -m$bits -O1 -o "$dir/counter" tests/fixtures/counter.c
	file -b "$dir/counter" | cut -d, -f1-2

	say "${bits}-bit: starting it; it appends 1, 2, 3, ... to $dir/count every 100 ms"
	start_alone "$dir/counter" "$dir/count" 100
	pid=$!
	disown "$pid" # no "Killed" job notice when the dump kills it
	sleep 1.2
	echo "pid $pid has counted to $(tail -n 1 "$dir/count")"

	say "${bits}-bit: cryopod dump -t $pid -D $dir/img (freezes it, saves it, kills it)"
	"$cryopod" dump -t "$pid" -D "$dir/img"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done # reaped: the pid is free
	last=$(tail -n 1 "$dir/count")
	echo "the process is gone; the file stops at $last"
	ls -l "$dir/img"

	say "${bits}-bit: cryopod show $dir/img (the start of the image as JSON)"
	"$cryopod" show "$dir/img" >"$dir/image.json"
	python3 -m json.tool "$dir/image.json" >"$dir/image.pretty.json"
	head -n 25 "$dir/image.pretty.json"
	echo "... ($(wc -l <"$dir/image.pretty.json") lines in all: $dir/image.pretty.json)"

	say "${bits}-bit: cryopod restore -D $dir/img -d (same pid, detached)"
	"$cryopod" restore -D "$dir/img" -d --pidfile "$dir/restored.pid"
	restored_pid=$(cat "$dir/restored.pid")
	echo "restored as pid $restored_pid (was $pid)"
	sleep 1.2
	echo "it counts on: now at $(tail -n 1 "$dir/count")"
	kill -9 "$restored_pid"
	restored_pid=""
	pid=""

	say "${bits}-bit: checking the file: every number once, in order"
	if awk 'NR != $1 { printf "line %d holds %s\n", NR, $1; bad = 1; exit 1 } END { exit bad }' "$dir/count"; then
		echo "lines $((last - 2))..$((last + 3)) around the dump: $(sed -n "$((last - 2)),$((last + 3))p" "$dir/count" | tr '\n' ' ')"
		echo "OK: $(wc -l <"$dir/count") numbers, no gap, no repeat"
	else
		echo "FAILED: the count has a gap or a repeat"
		exit 1
	fi
done

say "Done: both widths dumped, restored and continued"
