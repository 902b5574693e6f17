# MLflow tracking server for the compose stack: PostgreSQL backend store, S3 (MinIO)
# artifacts. Versions as pinned in ../requirements.txt.
FROM python:3.11.7-slim-bookworm
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && useradd --uid 1000 --create-home mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
