"""The bundled demo: a synthetic resume-bullet domain, its rubric, a tiny foundation model."""
