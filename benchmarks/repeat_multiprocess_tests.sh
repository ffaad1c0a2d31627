#!/usr/bin/env bash
# Runs every multi-process test (`pytest -m multiprocess`) N times in a row from a fresh clone of this repository's
# HEAD, with its own .venv installed by `make install`, and prints one line per round and a final count. A round that
# hangs is failed by the tests' time limits (pytest-timeout; child process trees are killed), never waited on forever.
#
#   bash benchmarks/repeat_multiprocess_tests.sh 20 | tee benchmarks/results/repeat_multiprocess_tests.txt
set -uo pipefail
rounds="${1:-20}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/clone"
cd "$work/clone"
echo "clone of $(git rev-parse --short HEAD) in a fresh directory; $(nproc) cores; $(date -u +%Y-%m-%dT%H:%MZ)"
make install > "$work/install.log" 2>&1 || { tail -20 "$work/install.log"; exit 1; }
passed=0
for round in $(seq 1 "$rounds"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -m multiprocess -q -p no:cacheprovider > "$work/round.log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  echo "round $round: rc $rc, $seconds s, $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$work/round.log" | tail -1)"
  if [ "$rc" -eq 0 ]; then passed=$((passed + 1)); else tail -40 "$work/round.log"; fi
done
echo "$passed/$rounds rounds passed"
