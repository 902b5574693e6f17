# The trainer image: every `rlhf run STEP` of a Kubernetes-backed run executes in it.
# CUDA PyTorch, the pinned requirements, the project, a non-root user.
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/rlhf-airflow/trainer:0.1.0 .
#
# CUDA comes with PyTorch: PyPI's Linux x86_64 wheel of torch==2.13.0 is the CUDA build
# and brings the CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels, so the image
# runs the exact torch that requirements.txt pins (and the tests ran); the GPU node needs
# only the NVIDIA driver and device plugin.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

# (DL3064 reads the TOKEN in TOKENIZERS_PARALLELISM as a secret; nothing here is one)
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    GX_ANALYTICS_ENABLED=False \
    MLFLOW_ENABLE_ASYNC_LOGGING=false

WORKDIR /opt/rlhf
COPY requirements.txt pyproject.toml ./
# torch first (its CUDA build from PyPI), then every other pinned package
RUN python -m pip install --no-cache-dir "$(grep '^torch==' requirements.txt)" \
    && python -m pip install --no-cache-dir -r requirements.txt

COPY rlhf_tasks ./rlhf_tasks
COPY plugins/rlhf_airflow ./plugins/rlhf_airflow
COPY configs ./configs
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation .

RUN groupadd --gid 1000 rlhf \
    && useradd --uid 1000 --gid rlhf --create-home --shell /usr/sbin/nologin rlhf \
    && mkdir -p /airflow/xcom /work \
    && chown -R rlhf:rlhf /airflow /work
USER 1000:1000
WORKDIR /work

# the pod operator passes `run STEP --config URI ... --result /airflow/xcom/return.json`
ENTRYPOINT ["rlhf"]
CMD ["steps"]
