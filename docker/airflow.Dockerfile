# The Airflow image: Airflow 3 with the providers, the project's light modules, plugins
# and DAGs. No torch: heavy steps run in trainer pods (docker/trainer.Dockerfile).
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/rlhf-airflow/airflow:0.1.0 .
# With --build-arg TRAINER=true (the compose stack's scheduler, which runs `backend: local`
# steps) the pinned training stack (CPU torch) goes into its own venv, /opt/rlhf/venv;
# point RLHF_STEP_PYTHON at /opt/rlhf/venv/bin/python. Airflow's environment stays torch-free.
FROM apache/airflow:3.3.2-python3.11

ARG TRAINER=false
ENV GX_ANALYTICS_ENABLED=False \
    PIP_NO_CACHE_DIR=1

USER 0
RUN mkdir -p /opt/rlhf && chown 50000:0 /opt/rlhf
USER 50000

COPY --chown=airflow:root docker/requirements-airflow.txt requirements.txt pyproject.toml /opt/rlhf/
RUN pip install --no-cache-dir -r /opt/rlhf/requirements-airflow.txt

COPY --chown=airflow:root rlhf_tasks /opt/rlhf/rlhf_tasks
COPY --chown=airflow:root plugins/rlhf_airflow /opt/rlhf/plugins/rlhf_airflow
RUN pip install --no-cache-dir --no-deps /opt/rlhf

RUN if [ "$TRAINER" = "true" ]; then \
      python -m venv /opt/rlhf/venv \
      && /opt/rlhf/venv/bin/pip install --no-cache-dir \
           --index-url https://download.pytorch.org/whl/cpu "$(grep '^torch==' /opt/rlhf/requirements.txt)" \
      && /opt/rlhf/venv/bin/pip install --no-cache-dir -r /opt/rlhf/requirements.txt \
      && /opt/rlhf/venv/bin/pip install --no-cache-dir --no-deps /opt/rlhf; \
    fi

COPY --chown=airflow:root plugins/rlhf_review.py plugins/.airflowignore /opt/airflow/plugins/
COPY --chown=airflow:root dags /opt/airflow/dags
