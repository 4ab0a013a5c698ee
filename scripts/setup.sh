#!/usr/bin/env bash
# Installs what building and testing cryopod needs beyond the Rust
# toolchain: gcc with 32-bit support (the test fixtures are built with -m64
# and -m32), busybox:i386 (a real 32-bit program for the tests), file and
# python3. Idempotent: installs only what is missing. Run as root (or with
# sudo available).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=(gcc gcc-multilib busybox:i386 file python3)

sudo=""
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || { echo "setup: run as root (or install sudo)" >&2; exit 1; }
	sudo=sudo
fi

installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

foreign_arch_added=no
if ! dpkg --print-foreign-architectures | grep -qx i386; then
	$sudo dpkg --add-architecture i386
	foreign_arch_added=yes
fi

missing=()
for p in "${packages[@]}"; do
	installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "setup: all packages present (${packages[*]})"
else
	echo "setup: installing ${missing[*]}"
	log=$(mktemp)
	if ! { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends \
		"${missing[@]}"; } >"$log" 2>&1; then
		cat "$log" >&2
		echo "setup: apt-get failed (i386 architecture added now: $foreign_arch_added)" >&2
		rm -f "$log"
		exit 1
	fi
	rm -f "$log"
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing: install a Rust toolchain" >&2; exit 1; }
# The tests rely on these; fail here with a clear word rather than later.
echo 'int main(void){return 0;}' | gcc -m32 -x c -o /dev/null - ||
	{ echo "setup: gcc -m32 cannot link (gcc-multilib)" >&2; exit 1; }
file -L /bin/busybox | grep -q 'ELF 32-bit' ||
	{ echo "setup: /bin/busybox is not the i386 build" >&2; exit 1; }
