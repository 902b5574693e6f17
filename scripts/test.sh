#!/usr/bin/env bash
# `make test`: the whole suite (unit, S3 over HTTP, DAG integrity, end to end).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
