#!/usr/bin/env bash
# Entry point for the benchmark: see tools/bench/bench.sh (and tools/bench/alloc.sh for the
# allocator comparison).
exec "$(dirname "$0")/bench/bench.sh" "$@"
