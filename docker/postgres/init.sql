-- One PostgreSQL for the stack: Airflow's metadata DB, MLflow's backend store and the
-- expert panel's verdict store, each with its own role.
CREATE ROLE airflow LOGIN PASSWORD 'airflow';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE rlhf LOGIN PASSWORD 'rlhf';
CREATE DATABASE panel OWNER rlhf;
