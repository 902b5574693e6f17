#!/usr/bin/env bash
# `make test`: the whole suite (unit, S3 over HTTP, PostgreSQL, DAG integrity, the review
# page in headless chromium, end to end).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
# the browser test drives Debian's chromium through chromedriver: install them if missing
if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo ">> installing Debian's chromium and chromium-driver (browser test)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver > .rlhf/apt.log 2>&1 \
      || { apt-get update -q > /dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q chromium chromium-driver > .rlhf/apt.log 2>&1; } \
      || echo "!! could not install chromium (see .rlhf/apt.log): the browser test will skip"
  else
    echo "!! chromium/chromedriver missing and not root: the browser test will skip"
  fi
fi
exec python -m pytest -q "$@"
