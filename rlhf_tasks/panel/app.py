"""The review web app: one blinded item at a time, pass or fail, by click or keyboard.

``create_app(store, identity)`` builds a FastAPI app; ``identity`` is a FastAPI
dependency returning the reviewer's name from authentication, never from a form field:

* standalone (``rlhf review serve``): :func:`token_identity`, reviewer tokens made by an
  admin (``rlhf review add-reviewer NAME``), sent as ``Authorization: Bearer`` or the
  cookie set by the login form;
* mounted in the Airflow UI: the Airflow login (see ``plugins/rlhf_airflow/review_app.py``).

Requests without an identity get 401; an identity that is not on the panel gets 403
(the identity dependency decides), and so does the run's own triggering user or approver
on its batch (the batch lists them; the batch list leaves it out for them).  Nothing a
reviewer can reach names the model behind an item.  Request bodies over
``MAX_BODY_BYTES`` get 413 before they are read whole; a verdict on a batch the gate has
closed, on an item the store did not serve to that reviewer, or on one that has its k
verdicts gets 409.

REST API (paths relative to where the app is mounted):
  GET  api/me                         who you are
  GET  api/batches                    review batches and their progress
  GET  api/batches/{id}/next          your next item (204 when you are done)
  GET  api/batches/{id}/progress      progress, with your own count
  POST api/items/{id}/verdict         {"passed": true|false, "comment": "..."}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable

from fastapi import Depends, FastAPI, Form, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from rlhf_tasks.errors import BadInput
from rlhf_tasks.panel.store import (AlreadyJudged, BatchClosed, ConflictOfInterest, NotServed,
                                    PanelStore, UnknownItem)

COOKIE = "rlhf_review_token"
PAGE = Path(__file__).with_name("review.html")
MAX_BODY_BYTES = 64 * 1024  # a verdict with a 5000-character comment is well under this


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, whether it says its
    length up front or streams it in chunks (counted as they arrive)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.limit
        except ValueError:
            too_big = True
        if too_big:
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send):
        body = f'{{"detail":"request body over {self.limit} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class VerdictIn(BaseModel):
    passed: bool
    comment: str = Field("", max_length=5000)


class SignInLimiter:
    """At most ``failures`` wrong tokens per client address in ``window_s`` seconds; then
    429 until the window has passed (a token cannot be guessed at the server's speed)."""

    def __init__(self, failures: int = 10, window_s: float = 300.0):
        import threading

        self.failures, self.window_s = failures, window_s
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(client, []) if now - t < self.window_s]
        self._seen[client] = times
        return times

    def check(self, client: str) -> None:
        import time

        with self._lock:
            if len(self._recent(client, time.monotonic())) >= self.failures:
                raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                    "too many failed sign-ins from this address; try later",
                                    headers={"Retry-After": str(int(self.window_s))})

    def failed(self, client: str) -> None:
        import time

        with self._lock:
            now = time.monotonic()
            self._recent(client, now).append(now)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def token_identity(store: PanelStore, limiter: SignInLimiter | None = None) -> Callable:
    """A dependency: the reviewer named by a bearer token or the login cookie, else 401
    (429 after too many wrong tokens from one address)."""
    limiter = limiter or SignInLimiter()

    def identity(request: Request) -> str:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else \
            request.cookies.get(COOKIE, "")
        if not token:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Not authenticated",
                                headers={"WWW-Authenticate": "Bearer"})
        limiter.check(_client(request))
        name = store.reviewer_for_token(token)
        if name is None:
            limiter.failed(_client(request))
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Not authenticated",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    identity.limiter = limiter
    return identity


def create_app(store: PanelStore, identity: Callable, *, login_form: bool,
               title: str = "Expert review") -> FastAPI:
    # note: routes take the identity as a ``Depends`` default; with postponed annotations
    # FastAPI could not resolve an ``Annotated`` alias local to this function
    # no /docs, /redoc or /openapi.json: the API is described in this module, and a
    # reviewer's browser needs none of them
    app = FastAPI(title=title, description=__doc__.split("\n\n")[0], docs_url=None,
                  redoc_url=None, openapi_url=None)
    limiter = getattr(identity, "limiter", None) or SignInLimiter()
    app.add_middleware(BodyLimit)
    authenticated = Depends(identity)  # a default, not an annotation: see the note above

    def batch_or_404(batch_id: str):
        try:
            return store.batch(batch_id)
        except BadInput:
            raise HTTPException(404, f"no review batch {batch_id}") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        # the page holds no data: everything comes from the authenticated API
        return PAGE.read_text(encoding="utf-8").replace(
            "{{LOGIN_FORM}}", "true" if login_form else "false")

    if login_form:
        @app.post("/login", include_in_schema=False)
        def login(token: Annotated[str, Form()], request: Request):
            limiter.check(_client(request))
            if store.reviewer_for_token(token) is None:
                limiter.failed(_client(request))
                raise HTTPException(401, "unknown reviewer token")
            response = RedirectResponse("./", status_code=303)
            # Secure whenever the page came over TLS (behind a proxy: run uvicorn with
            # --proxy-headers so that the scheme is the client's)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https",
                                max_age=14 * 24 * 3600)
            return response

        @app.post("/logout", include_in_schema=False)
        def logout():
            response = RedirectResponse("./", status_code=303)
            response.delete_cookie(COOKIE)
            return response

    @app.get("/api/me")
    def me(reviewer: str = authenticated) -> dict:
        return {"reviewer": reviewer}

    @app.get("/api/batches")
    def batches(reviewer: str = authenticated) -> list[dict]:
        out = []
        for b in store.batches():
            if reviewer in b.excluded_reviewers:
                continue  # their own run's batch: not theirs to judge
            out.append({"id": b.id, "pipeline": b.pipeline, "run_id": b.run_id,
                        "created_at": b.created_at.isoformat(), "simulated": b.simulated,
                        **store.progress(b.id, reviewer)})
        return out

    @app.get("/api/batches/{batch_id}/next")
    def next_item(batch_id: str, reviewer: str = authenticated):
        batch_or_404(batch_id)
        try:
            item = store.next_item(batch_id, reviewer)
        except ConflictOfInterest as exc:
            raise HTTPException(403, str(exc)) from None
        if item is None:
            return Response(status_code=204)
        return item.as_dict()

    @app.get("/api/batches/{batch_id}/progress")
    def progress(batch_id: str, reviewer: str = authenticated) -> dict:
        batch_or_404(batch_id)
        return store.progress(batch_id, reviewer)

    @app.post("/api/items/{item_id}/verdict", status_code=201)
    def verdict(item_id: str, body: VerdictIn, request: Request, reviewer: str = authenticated) -> dict:
        source = "web" if request.headers.get("x-review-client") == "page" else "api"
        try:
            verdict_id = store.record_verdict(item_id, reviewer, body.passed, body.comment,
                                              source=source)
        except UnknownItem:
            raise HTTPException(404, f"no item {item_id}") from None
        except ConflictOfInterest as exc:
            raise HTTPException(403, str(exc)) from None
        except (AlreadyJudged, BatchClosed, NotServed) as exc:
            raise HTTPException(409, str(exc)) from None
        return {"id": verdict_id, "item_id": item_id, "reviewer": reviewer,
                "passed": body.passed}

    return app

