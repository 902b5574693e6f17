#!/usr/bin/env bash
# `make airflow`: Airflow standalone (api-server, scheduler, dag-processor, triggerer) with
# the project's DAGs and plugins, and an MLflow UI, on the embedded defaults. Ctrl-C stops both.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"

echo ">> demo assets (.rlhf/demo)"
rlhf demo init --out .rlhf/demo > /dev/null
# the same recipe with people as the panel, sized so that one person can finish it
# (k = 1, 20 eval prompts): `PANEL=human make airflow`.  The panel is governance, so it
# is the base config's: a run's config_file cannot switch it
python - <<'PY'
import yaml
raw = yaml.safe_load(open(".rlhf/demo/demo.yaml"))
raw["panel"].update(mode="human", simulated_may_promote=False, verdicts_per_item=1)
raw["evaluation"]["max_prompts"] = 20
open(".rlhf/demo/human-panel.yaml", "w").write(yaml.safe_dump(raw, sort_keys=False))
PY
PANEL="${PANEL:-simulated}"
case "$PANEL" in
  simulated) export RLHF_BASE_CONFIG="$ROOT/.rlhf/demo/demo.yaml" ;;
  human) export RLHF_BASE_CONFIG="$ROOT/.rlhf/demo/human-panel.yaml" ;;
  *) echo "PANEL is simulated or human, not '$PANEL'" >&2; exit 2 ;;
esac
export RLHF_CONFIG_DIR="$ROOT/.rlhf/demo"                # run defaults the form may name
# the Airflow user "reviewer" is on the panel (the review page refuses everyone else)
rlhf review add-reviewer reviewer --airflow-user --config "$RLHF_BASE_CONFIG" > /dev/null
export AIRFLOW__API__PORT="$AIRFLOW_PORT"
# tasks reach the execution API, and links point, at this port (not Airflow's 8080 default)
export AIRFLOW__API__BASE_URL="http://localhost:$AIRFLOW_PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://localhost:$AIRFLOW_PORT/execution/"
export RLHF_MLFLOW_UI_URL="http://localhost:$MLFLOW_PORT"   # the tasks' "MLflow run" links
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin,reviewer:viewer}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/passwords.json"
export AIRFLOW__LOGGING__LOGGING_LEVEL=INFO

airflow db migrate > "$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }
# GPU steps run in the `gpu` pool (a slot per GPU a step holds): as many slots as GPUs
# here, at least one; RLHF_GPU_SLOTS sets another number
GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
airflow pools set gpu "${RLHF_GPU_SLOTS:-$(( GPUS > 0 ? GPUS : 1 ))}" "GPU steps (rlhf)" \
  >> "$AIRFLOW_HOME/migrate.log" 2>&1
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "sqlite:///$ROOT/.rlhf/mlflow.db" --host 127.0.0.1 \
  --port "$MLFLOW_PORT" > .rlhf/mlflow-ui.log 2>&1 &
MLFLOW_PID=$!
airflow standalone > .rlhf/airflow-standalone.log 2>&1 &
AIRFLOW_PID=$!
trap 'echo; echo ">> stopping"; kill $AIRFLOW_PID $MLFLOW_PID 2> /dev/null; wait; exit 0' INT TERM

echo ">> starting Airflow standalone (log: .rlhf/airflow-standalone.log) and the MLflow UI"
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" > /dev/null \
     && curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" > /dev/null; then
    break
  fi
  kill -0 $AIRFLOW_PID 2> /dev/null || { tail -30 .rlhf/airflow-standalone.log; exit 1; }
  sleep 1
done
python - "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" "$AIRFLOW_PORT" "$MLFLOW_PORT" <<'PY'
import json, os, sys
passwords = json.load(open(sys.argv[1]))
airflow, mlflow = sys.argv[2], sys.argv[3]
print(f"""
  Airflow UI      http://localhost:{airflow}/   (DAG rlhf_tuning: Trigger opens the form)
  login           """ + "; ".join(f"{u} / {p}" for u, p in passwords.items()) + f"""
  expert review   http://localhost:{airflow}/rlhf-review/   (Browse > Expert review; as the logged-in user)
  MLflow UI       http://localhost:{mlflow}/   (experiment rlhf-tuning: tick two runs, Compare)

  The panel: """ + ("people: review the outputs yourself as \"reviewer\" (k = 1); for k = 3,\n"
  "  add two more (rlhf review add-reviewer NAME --airflow-user) and raise\n"
  "  panel.verdicts_per_item in .rlhf/demo/human-panel.yaml"
  if "human-panel" in os.environ["RLHF_BASE_CONFIG"] else
  "the demo's simulated raters; `PANEL=human make airflow` to judge the outputs\n"
  "  yourself") + """
  Ctrl-C stops Airflow and MLflow.""")
PY
wait
