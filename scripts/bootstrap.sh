#!/usr/bin/env bash
# Creates .venv and installs vit-registers from this repository's own files, offline-safe after the first install.
#   bash scripts/bootstrap.sh          runtime only (the analysis CLI, the Space)
#   bash scripts/bootstrap.sh --test   plus the test extras and Debian's Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torch first, pinned, so that no resolver pulls another build; everything else against the tested versions
pip install torch==2.14.1 torchvision==0.29.1
if [ "$with_tests" = 1 ]; then
  pip install -c requirements/constraints.txt -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "bootstrap: could not install Debian's chromium; the browser tests will fail" >&2
  fi
else
  pip install -c requirements/constraints.txt -e .
fi
