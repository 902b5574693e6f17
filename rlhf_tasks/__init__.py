"""rlhf_tasks: every pipeline step as plain Python, runnable without Airflow.

Light modules (config, errors, storage) import nothing heavy; steps import torch,
transformers, great_expectations lazily inside their functions.
"""

__version__ = "0.1.0"
