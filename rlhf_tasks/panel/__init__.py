"""The expert panel: blinded review batches, the verdict store, the review web app,
aggregation (majority, Wilson intervals, Fleiss' kappa, the exact McNemar test), the gate
policy and the simulated panel of the demo.

Light modules (store, aggregate, gate) import SQLAlchemy and the standard library only,
so the Airflow plugin can use them; the web app imports FastAPI.
"""
