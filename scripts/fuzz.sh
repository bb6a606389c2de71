#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each). Needs the nightly toolchain;
# installs cargo-fuzz from crates.io if it is missing. Crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! rustup toolchain list | grep -q nightly; then
    echo "fuzzing needs the nightly toolchain (rustup toolchain list shows none)" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
mkdir -p fuzz/corpus
for target in $(cargo +nightly fuzz list); do
    echo "== fuzz $target for ${secs}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
