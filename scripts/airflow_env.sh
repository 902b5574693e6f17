# Sourced by the demo and test scripts: an embedded Airflow under .rlhf/airflow (SQLite).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
export RLHF_WORKDIR="$ROOT"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.rlhf/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-WARNING}"
export GX_ANALYTICS_ENABLED=False
export MLFLOW_ENABLE_ASYNC_LOGGING=false
export TOKENIZERS_PARALLELISM=false
mkdir -p "$AIRFLOW_HOME"
