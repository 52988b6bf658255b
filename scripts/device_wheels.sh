#!/usr/bin/env bash
# The wheels for a lent GPU machine: ../shared/device/wheels.sh's stack plus bench/device_wheels.txt (what
# llm-foundry and Composer import that the device image lacks). Run from the project root; ~36 MB in .whl/.
# Every device call then carries [".whl"] and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_WHEELS="$(grep -v '^#' bench/device_wheels.txt | grep -v '^$' | tr '\n' ' ')" bash ../shared/device/wheels.sh
