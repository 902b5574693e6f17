"""The review page inside the Airflow 3 UI (registered by ``plugins/rlhf_review.py``).

The panel's FastAPI app (``rlhf_tasks.panel.app``), mounted at ``/rlhf-review`` on the
API server, with an "Expert review" entry in the navigation.  Airflow does not
authenticate plugin apps, so the app does: every API route depends on Airflow's own
``get_user`` (the JWT of the Airflow login, from the ``Authorization`` header or the UI's
cookie); requests without it get 401.  The reviewer recorded with a verdict is that
Airflow user.  The verdict store is ``$RLHF_PANEL_STORE_URL``, else the base config's
``panel.store_url``; it is opened on the first request, not when plugins load.
"""

from __future__ import annotations

import functools

URL_PREFIX = "/rlhf-review"


class _LazyStore:
    """The PanelStore, created on first use (plugins load in every Airflow process)."""

    @functools.cached_property
    def _store(self):
        from rlhf_airflow.scheduling import base_config
        from rlhf_tasks.config import PipelineConfig
        from rlhf_tasks.panel.store import PanelStore, panel_store_url

        return PanelStore(panel_store_url(base_config() or PipelineConfig()))

    def __getattr__(self, name):
        return getattr(self._store, name)


def airflow_identity():
    """A FastAPI dependency: the Airflow user's name (401 without a valid login)."""
    from fastapi import Depends

    from airflow.api_fastapi.core_api.security import get_user

    async def identity(user=Depends(get_user)) -> str:
        return user.get_name()

    return identity


def build_app():
    from rlhf_tasks.panel.app import create_app

    return create_app(_LazyStore(), airflow_identity(), login_form=False)
