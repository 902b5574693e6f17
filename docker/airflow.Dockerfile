# The Airflow image: Airflow 3 with the providers, the project's light modules, plugins
# and DAGs. No torch: heavy steps run in trainer pods (or, for `backend: local`, on a
# worker built from the trainer image).
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/rlhf-airflow/airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

ENV GX_ANALYTICS_ENABLED=False \
    PIP_NO_CACHE_DIR=1

COPY --chown=airflow:root docker/requirements-airflow.txt /opt/rlhf/requirements-airflow.txt
RUN pip install --no-cache-dir -r /opt/rlhf/requirements-airflow.txt

COPY --chown=airflow:root pyproject.toml /opt/rlhf/
COPY --chown=airflow:root rlhf_tasks /opt/rlhf/rlhf_tasks
COPY --chown=airflow:root plugins/rlhf_airflow /opt/rlhf/plugins/rlhf_airflow
RUN pip install --no-cache-dir --no-deps /opt/rlhf

COPY --chown=airflow:root plugins/rlhf_review.py plugins/.airflowignore /opt/airflow/plugins/
COPY --chown=airflow:root dags /opt/airflow/dags

USER airflow
