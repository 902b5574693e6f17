#!/usr/bin/env bash
# `make demo`: build the offline demo assets, then run the real DAG on them with
# `airflow dags test` (embedded defaults: SQLite, local artifacts, local MLflow).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
source "$(dirname "$0")/demo_dag.sh"
cd "$ROOT"
started=$(date +%s)

echo ">> demo assets (.rlhf/demo)"
rlhf demo init --out .rlhf/demo

run_demo_dag "$ROOT/.rlhf/demo/demo.yaml" "$ROOT/.rlhf/last_demo.log"

echo
echo "Done in $(( $(date +%s) - started )) s."
echo "  artifacts:   $ROOT/.rlhf/artifacts/rlhf_tuning/"
echo "  Data Docs:   $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/validate_preference/data_docs/index.html"
echo "  PPO curves:  MLflow run 'ppo' of the pipeline run, artifact ppo/curves.png"
echo "  panel:       $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/gate/report.html"
echo "  review page: .venv/bin/rlhf review serve --config .rlhf/demo/demo.yaml"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/.rlhf/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo.log"
