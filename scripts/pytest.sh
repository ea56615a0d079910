#!/usr/bin/env bash
# Runs the whole pytest suite from the project's venv. pytest's exit code 5 ("no tests ran")
# is a failure here: a suite that collected nothing has proven nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
