# Sourced by the demo scripts: `run_demo_dag CONFIG LOG` migrates the embedded Airflow DB,
# runs `airflow dags test rlhf_tuning` with CONFIG as the base config (the demo plays the
# admin: the form cannot override governance fields, and only the admin's config lets a
# simulated panel promote), lists the tasks done, fails on an unsuccessful run, and prints
# the run's summary (rlhf_tasks/demo/summary.py).
run_demo_dag() {
  local config="$1" log="$2"
  echo ">> Airflow metadata DB ($AIRFLOW_HOME)"
  airflow db migrate > "$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; return 1; }
  echo ">> airflow dags test rlhf_tuning (log: $log)"
  RLHF_BASE_CONFIG="$config" AIRFLOW__LOGGING__LOGGING_LEVEL=INFO \
    airflow dags test rlhf_tuning -c "{\"config_file\": \"$config\"}" > "$log" 2>&1 || true
  grep -oE "\[DAG TEST\] end task task_id=[a-z_.]+" "$log" | sed 's/.*task_id=/   done: /' || true
  if ! grep -qE "DagRun Finished: .*state=success" "$log"; then
    grep -E "rlhf: error|exited with code" "$log" | tail -5 || true
    echo "!! the DAG run did not succeed; full log: $log"; return 1
  fi
  python -m rlhf_tasks.demo.summary "$config"
}
