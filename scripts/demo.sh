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

echo ">> airflow dags test rlhf_tuning (log: .rlhf/last_demo.log)"
# the demo plays the admin: its config is the base config (the form cannot override
# governance fields, and only the admin's config lets a simulated panel promote)
conf="{\"config_file\": \"$ROOT/.rlhf/demo/demo.yaml\"}"
RLHF_BASE_CONFIG="$ROOT/.rlhf/demo/demo.yaml" AIRFLOW__LOGGING__LOGGING_LEVEL=INFO airflow dags test rlhf_tuning -c "$conf" > "$ROOT/.rlhf/last_demo.log" 2>&1 || true
grep -oE "\[DAG TEST\] end task task_id=[a-z_.]+" "$ROOT/.rlhf/last_demo.log" | sed 's/.*task_id=/   done: /' || true
if ! grep -qE "DagRun Finished: .*state=success" "$ROOT/.rlhf/last_demo.log"; then
  grep -E "rlhf: error|exited with code" "$ROOT/.rlhf/last_demo.log" | tail -5 || true
  echo "!! the DAG run did not succeed; full log: .rlhf/last_demo.log"; exit 1
fi
python -m rlhf_tasks.demo.summary "$ROOT/.rlhf/demo/demo.yaml"

echo
echo "Done in $(( $(date +%s) - started )) s."
echo "  artifacts:   $ROOT/.rlhf/artifacts/rlhf_tuning/"
echo "  Data Docs:   $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/validate_preference/data_docs/index.html"
echo "  PPO curves:  MLflow run 'ppo' of the pipeline run, artifact ppo/curves.png"
echo "  panel:       $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/gate/report.html"
echo "  review page: .venv/bin/rlhf review serve --config .rlhf/demo/demo.yaml"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/.rlhf/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo.log"
