"""Shared fixtures: demo data and tokenizer, a config factory, an S3 API over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo's datasets and tokenizer (no model: validation needs only the tokenizer)."""
    from rlhf_tasks.demo.assets import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, model=False)
    return out


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The demo with a foundation model trained for fewer steps (about 30 s on 2 cores)."""
    from rlhf_tasks.demo.assets import build_demo

    out = tmp_path_factory.mktemp("demo-model")
    build_demo(out, foundation_steps=200)
    return out


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from rlhf_tasks.models import load_tokenizer_from

    return load_tokenizer_from(str(demo_dir / "foundation"))


@pytest.fixture
def make_config(tmp_path, demo_dir):
    """A PipelineConfig with its artifacts and MLflow store inside tmp_path."""
    from rlhf_tasks import config

    def make(**sections):
        raw = {
            "model": {"base_model": str(demo_dir / "foundation")},
            "storage": {"artifact_root": str(tmp_path / "artifacts"),
                        "allowed_roots": [str(tmp_path), str(demo_dir)]},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                         "artifact_location": (tmp_path / "mlartifacts").as_uri()},
            "data": {"min_preference_rows": 1, "min_prompt_rows": 1, "min_eval_rows": 1},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return config.validate(raw)

    return make


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port: a real S3 API over HTTP."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint, request):
    import boto3

    name = "rlhf-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


POSTGRES_DSN = os.environ.get("RLHF_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")


@pytest.fixture()
def postgres_database():
    """A factory of fresh databases on the local PostgreSQL (trust auth), dropped afterwards."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine(f"{POSTGRES_DSN}/postgres", isolation_level="AUTOCOMMIT")
    made = []

    def make(prefix: str = "rlhf_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        try:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        except sqlalchemy.exc.OperationalError as exc:  # pragma: no cover - machine set-up
            pytest.fail(f"PostgreSQL at {POSTGRES_DSN} is not reachable: {exc}")
        made.append(name)
        return f"{POSTGRES_DSN}/{name}"

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def postgres_url(postgres_database):
    return postgres_database()


def wait_http(url: str, proc, timeout: float = 180) -> None:
    """Until ``url`` answers 200; fails if the server process ``proc`` exits first."""
    import time

    import httpx

    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"the server for {url} exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s")


@contextlib.contextmanager
def review_server(store):
    """The standalone review app (reviewer tokens) over real HTTP on a free port; yields
    its base URL (ending in /)."""
    import threading
    import time

    import uvicorn

    from rlhf_tasks.panel.app import create_app, token_identity

    server = uvicorn.Server(uvicorn.Config(create_app(store, token_identity(store),
                                                      login_form=True),
                                           host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:  # a condition, with a generous bound
        assert thread.is_alive() and time.monotonic() < end, "the review server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def webhook_receiver():
    """A real HTTP server that records JSON POSTs; yields (base URL, received list)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"),
                             **json.loads(body)})
            self.send_response(200)  # as Slack answers a webhook
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def smtp_server():
    """A real SMTP server (aiosmtpd) that records messages; yields (port, messages)."""
    from email import message_from_bytes
    from email.policy import default

    from aiosmtpd.controller import Controller

    messages: list = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
            message = message_from_bytes(envelope.content, policy=default)
            messages.append({"to": list(envelope.rcpt_tos), "from": envelope.mail_from,
                             "subject": str(message["Subject"]),
                             "body": message.get_body(("html", "plain")).get_content()})
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, messages
    finally:
        controller.stop()


def smtp_connection(port: int) -> str:
    """An Airflow connection (JSON, for AIRFLOW_CONN_*) to the test's SMTP server."""
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "login": "rlhf@example.org",
                       "extra": {"disable_tls": True, "disable_ssl": True,
                                 "to": ["panel@example.org", "ml-team@example.org"],
                                 "from_email": "rlhf@example.org"}})


def webhook_connection(base: str, token: str | None = None) -> str:
    host, port = base.removeprefix("http://").split(":")
    conn = {"conn_type": "http", "host": host, "port": int(port),
            "extra": {"endpoint": "hooks/rlhf"}}
    if token:
        conn["password"] = token
    return json.dumps(conn)


# Two workers (scripts/test.sh runs `-n 2` where pytest-xdist is there): a module's tests
# stay on one worker (its module fixtures are built once), but the two whole runs of the
# DAG (the production stack and `airflow dags test`; the longest tests, waiting on services
# more than computing) form one unit that starts first, so that the other worker computes
# beside it.  Run side by side instead, they slowed each other (563 s in all, against 487).
AIRFLOW_RUNS = ("tests/test_production_stack.py::",
                "tests/test_e2e_dag.py::test_dag_validates_trains_and_tracks")


def _unit(nodeid: str) -> str:
    if nodeid.startswith(AIRFLOW_RUNS):
        return "airflow"
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _unit(item.nodeid) != "airflow")  # stable: order kept


def pytest_xdist_make_scheduler(config, log):
    """Load scheduling by the units above, in collection order (``--no-loadscope-reorder``;
    xdist's own xdist_group marks do not reach pytest 9's node ids)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByUnit(config, log)
