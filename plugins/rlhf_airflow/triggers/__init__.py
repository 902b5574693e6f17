"""Triggers of the rlhf_airflow provider-style package."""
