"""Operators of the rlhf_airflow provider-style package."""
