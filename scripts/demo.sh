#!/usr/bin/env bash
# `make demo`: build the offline demo assets, then run the real DAG on them with
# `airflow dags test` (embedded defaults: SQLite, local artifacts, local MLflow).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
started=$(date +%s)

echo ">> demo assets (.rlhf/demo)"
rlhf demo init --out .rlhf/demo

echo ">> Airflow metadata DB ($AIRFLOW_HOME)"
airflow db migrate > "$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }

echo ">> airflow dags test rlhf_tuning"
conf="{\"config_file\": \"$ROOT/.rlhf/demo/demo.yaml\"}"
airflow dags test rlhf_tuning -c "$conf" 2>&1 | tee "$ROOT/.rlhf/last_demo.log" | grep -E "rlhf: error|step .* done|validated|DagRun Finished|state=|ERROR" || true
if ! grep -q "state=success" "$ROOT/.rlhf/last_demo.log" && ! grep -qi "DagRun Finished.*success" "$ROOT/.rlhf/last_demo.log"; then
  echo "!! the DAG run did not succeed; full log: .rlhf/last_demo.log"; exit 1
fi

echo
echo "Done in $(( $(date +%s) - started )) s."
echo "  artifacts:   $ROOT/.rlhf/artifacts/rlhf_tuning/"
echo "  Data Docs:   $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/validate_preference/data_docs/index.html"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/.rlhf/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo.log"
