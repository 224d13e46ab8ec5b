#!/usr/bin/env bash
# Peak memory and throughput of hashing a large artifact with `weir registry add`.
# Target: a 1 GiB artifact hashes with peak RSS under 100 MiB.
#
# usage: benches/hash_memory.sh [SIZE_MIB=1024]
# needs: GNU time (apt-get install time). Writes a sparse-free random file under $TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
command -v /usr/bin/time >/dev/null || { echo "GNU time is missing: apt-get install -y time" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/weir
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/weights.bin"
sync
cd "$work"
/usr/bin/time -f '%M %e' -o time.txt "$BIN" registry --registry r.toml add --model big --version v1 \
  --artifact weights.bin > add.txt
read -r peak_kib seconds < time.txt
expected=$(sha256sum weights.bin | cut -d' ' -f1)
grep -q "$expected" add.txt || { echo "digest differs from sha256sum!" >&2; cat add.txt >&2; exit 1; }
awk -v kib="$peak_kib" -v s="$seconds" -v mib="$SIZE_MIB" 'BEGIN {
  printf "artifact %d MiB: peak RSS %.1f MiB, %.2f s, %.0f MiB/s (digest matches sha256sum)\n", mib, kib / 1024, s, mib / s
}'
