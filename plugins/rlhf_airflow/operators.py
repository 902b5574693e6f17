"""``RlhfStepOperator``: runs one ``rlhf run STEP`` on the chosen backend.

Returns the step's JSON result (XCom).  Exit code 2 (bad input or config) fails the task
without retries; any other failure raises an ordinary error, so Airflow retries and the
step resumes from its checkpoints.
"""

from __future__ import annotations

from typing import Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from rlhf_airflow.backends import StepFailed, get_backend, step_argv


class RlhfStepOperator(BaseOperator):
    template_fields: Sequence[str] = ("config_uri", "overrides", "backend")
    ui_color = "#e8d5f5"

    def __init__(self, *, step: str, config_uri: str, overrides: list[str] | None = None,
                 backend: str = "local", **kwargs):
        super().__init__(**kwargs)
        self.step, self.config_uri = step, config_uri
        self.overrides, self.backend = list(overrides or []), backend

    def execute(self, context):
        backend = get_backend(self.backend)
        argv = step_argv(self.step, self.config_uri, self.overrides, "@RESULT@")
        try:
            return backend.run(self.step, argv, self.log.info)
        except StepFailed as exc:
            if exc.bad_input:
                raise AirflowFailException(str(exc)) from None
            raise RuntimeError(str(exc)) from None
