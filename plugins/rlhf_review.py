"""Airflow plugin entry: the expert panel's review page in the Airflow UI.

Airflow imports every ``.py`` file under the plugins folder as a top-level module named
after the file (``step``, ``panel``, ``__init__`` ...), so the ``rlhf_airflow`` package is
listed in ``.airflowignore`` (it is imported as a package, from the plugins folder on
``sys.path``) and this one file registers the plugin.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from rlhf_airflow.links import MlflowRunLink
from rlhf_airflow.review_app import URL_PREFIX, build_app


class RlhfReviewPlugin(AirflowPlugin):
    name = "rlhf_review"
    operator_extra_links = [MlflowRunLink()]
    fastapi_apps = [{"app": build_app(), "url_prefix": URL_PREFIX, "name": "Expert review"}]
    external_views = [{"name": "Expert review", "href": f"{URL_PREFIX}/", "destination": "nav",
                       "category": "browse", "url_route": "rlhf-review"}]
