"""The review page inside the Airflow 3 UI (registered by ``plugins/rlhf_review.py``).

The panel's FastAPI app (``rlhf_tasks.panel.app``), mounted at ``/rlhf-review`` on the
API server, with an "Expert review" entry in the navigation.  Airflow does not
authenticate plugin apps, so the app does: every API route depends on Airflow's own
``get_user`` (the JWT of the Airflow login, from the ``Authorization`` header or the UI's
cookie); requests without it get 401.  Only members of the panel may list batches,
read items and vote; everyone else (a Viewer, an Admin who is not on the panel, whoever
triggered the run) gets 403.  A member is a user whose Airflow role is one of the base
config's ``panel.reviewer_roles``, or whose user id is on the store's reviewer list
(``rlhf review add-reviewer ID --airflow-user``).  The reviewer recorded with a verdict is
the Airflow user id (never the display name, which users may share or change).  The
verdict store is ``$RLHF_PANEL_STORE_URL``, else the base config's ``panel.store_url``;
it is opened on the first request, not when plugins load.
"""

from __future__ import annotations

import functools

URL_PREFIX = "/rlhf-review"


@functools.cache
def _panel_config():
    """The base config, read once per process (on first use, not when plugins load), as
    the store is: reviewer roles are not re-read from disk on every request."""
    from rlhf_airflow.scheduling import base_config
    from rlhf_tasks.config import PipelineConfig

    return base_config() or PipelineConfig()


class _LazyStore:
    """The PanelStore, created on first use (plugins load in every Airflow process)."""

    @functools.cached_property
    def _store(self):
        from rlhf_tasks.panel.store import PanelStore, panel_store_url

        return PanelStore(panel_store_url(_panel_config()))

    def __getattr__(self, name):
        return getattr(self._store, name)


def user_roles(user) -> set[str]:
    """The role names of an Airflow user, for the auth managers that have roles: the
    simple auth manager's one ``role``, FAB's ``roles``."""
    roles = set()
    role = getattr(user, "role", None)
    if isinstance(role, str) and role:
        roles.add(role)
    for item in getattr(user, "roles", None) or []:
        roles.add(getattr(item, "name", item))
    return {str(r).lower() for r in roles}


def airflow_identity(store, reviewer_roles):
    """A FastAPI dependency: the Airflow user's id, when they are on the panel (401
    without a valid login, 403 for a user who is not a member)."""
    import asyncio

    from fastapi import Depends, HTTPException

    from airflow.api_fastapi.core_api.security import get_user

    async def identity(user=Depends(get_user)) -> str:
        user_id = str(user.get_id())
        if user_roles(user) & {r.lower() for r in reviewer_roles()}:
            return user_id
        if await asyncio.to_thread(store.is_member, user_id):
            return user_id
        raise HTTPException(403, f"user {user_id!r} is not on the expert panel")

    return identity


def build_app():
    from rlhf_tasks.panel.app import create_app

    store = _LazyStore()
    return create_app(store, airflow_identity(
        store, lambda: _panel_config().panel.reviewer_roles), login_form=False)
