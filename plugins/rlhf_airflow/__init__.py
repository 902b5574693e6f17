"""Airflow glue for rlhf_tasks: the step operator, its backends, the trigger form.

Imports airflow and the light parts of rlhf_tasks (config, storage); never torch.
"""
