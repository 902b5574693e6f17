#!/usr/bin/env bash
# `make test`: the whole suite (unit, S3 over HTTP, PostgreSQL, DAG integrity, the review
# page in headless chromium, end to end).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
mkdir -p .rlhf
# Debian packages some tests drive: chromium + chromedriver (the review page in a real
# browser), docker-compose (`config` validates the compose stack; no engine needed)
missing=()
command -v chromium > /dev/null || missing+=(chromium)
command -v chromedriver > /dev/null || missing+=(chromium-driver)
command -v docker-compose > /dev/null || docker compose version > /dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo ">> installing Debian packages for the tests: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" > .rlhf/apt.log 2>&1 \
      || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q "${missing[@]}" > .rlhf/apt.log 2>&1; } \
      || echo "!! could not install ${missing[*]} (see .rlhf/apt.log): those tests will skip"
  else
    echo "!! missing ${missing[*]} and not root: those tests will skip"
  fi
fi
# two workers where the machine has two cores or more (tests/conftest.py schedules them);
# each process computes on one thread, so the two workers do not fight over the cores
workers=()
if [ "$(nproc)" -ge 2 ] && python -c "import xdist" 2> /dev/null; then
  workers=(-n 2 --no-loadscope-reorder)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
fi
exec python -m pytest -q --durations=30 "${workers[@]}" "$@"
