"""The review API: authentication (401 without it), blinding, verdicts, offline files."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from rlhf_tasks.errors import BadInput
from rlhf_tasks.panel.app import create_app, token_identity
from rlhf_tasks.panel.offline import export_batch, import_verdicts, parse_verdict
from rlhf_tasks.panel.store import PanelStore

MODELS = ("modelalpha", "modelbeta")


@pytest.fixture()
def store(tmp_path):
    s = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    items = [{"prompt_index": i, "prompt": f"prompt {i}", "response": f"answer {i}{m[-1]}",
              "model": m} for i in range(3) for m in MODELS]
    s.batch_id = s.create_batch(pipeline="p", run_id="r", items=items, verdicts_per_item=2,
                                quality_bar="The bar.", simulated=False)
    yield s
    s.dispose()


@pytest.fixture()
def client(store):
    return TestClient(create_app(store, token_identity(store), login_form=True))


def test_every_api_route_needs_authentication(client, store):
    batch, item = store.batch_id, store.items(store.batch_id)[0]["id"]
    for method, path in [("get", "/api/me"), ("get", "/api/batches"),
                         ("get", f"/api/batches/{batch}/next"),
                         ("get", f"/api/batches/{batch}/progress"),
                         ("post", f"/api/items/{item}/verdict")]:
        response = getattr(client, method)(path, **({"json": {"passed": True}}
                                                     if method == "post" else {}))
        assert response.status_code == 401, path
        bad = getattr(client, method)(path, headers={"Authorization": "Bearer wrong"},
                                      **({"json": {"passed": True}} if method == "post" else {}))
        assert bad.status_code == 401, path
    assert store.verdict_rows(batch) == []
    assert client.post("/login", data={"token": "wrong"}).status_code == 401


def test_reviewers_judge_blind_items_through_the_api(client, store):
    tokens = {name: store.add_reviewer(name) for name in ("ann", "bob")}
    auth = {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
    assert client.get("/api/me", headers=auth["ann"]).json() == {"reviewer": "ann"}
    batches = client.get("/api/batches", headers=auth["ann"]).json()
    assert [b["id"] for b in batches] == [store.batch_id]
    judged = 0
    for name in ("ann", "bob"):
        while True:
            response = client.get(f"/api/batches/{store.batch_id}/next", headers=auth[name])
            if response.status_code == 204:
                break
            item = response.json()
            assert "model" not in item and not any(m in response.text for m in MODELS)
            assert item["quality_bar"] == "The bar."
            # the identity comes from the token: a "reviewer" field in the body is ignored
            posted = client.post(f"/api/items/{item['id']}/verdict", headers=auth[name],
                                 json={"passed": judged % 3 != 0, "comment": "ok",
                                       "reviewer": "mallory"})
            assert posted.status_code == 201 and posted.json()["reviewer"] == name
            again = client.post(f"/api/items/{item['id']}/verdict", headers=auth[name],
                                json={"passed": False})
            assert again.status_code == 409
            judged += 1
    assert judged == 12
    progress = client.get(f"/api/batches/{store.batch_id}/progress", headers=auth["bob"]).json()
    assert progress["complete"] and progress["judged_by_reviewer"] == 6
    assert {r["reviewer"] for r in store.verdict_rows(store.batch_id)} == {"ann", "bob"}
    assert {r["source"] for r in store.verdict_rows(store.batch_id)} == {"api"}
    assert client.post("/api/items/nope/verdict", headers=auth["ann"],
                       json={"passed": True}).status_code == 404


def test_login_cookie_and_page(client, store):
    token = store.add_reviewer("ann")
    page = client.get("/")
    assert page.status_code == 200 and "Expert review" in page.text
    assert not any(m in page.text for m in MODELS)
    response = client.post("/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303
    assert "httponly" in response.headers["set-cookie"].lower()
    assert client.get("/api/me").json() == {"reviewer": "ann"}  # the cookie now


def test_export_then_import_round_trip(store, tmp_path):
    for suffix in ("csv", "jsonl"):
        path = tmp_path / f"batch.{suffix}"
        assert export_batch(store, store.batch_id, path) == 6
        text = path.read_text()
        assert not any(m in text for m in MODELS)
        if suffix == "csv":
            lines = text.splitlines()
            filled = [lines[0]] + [ln.rstrip(",") + (",pass," if i % 2 else ",FAIL,too long")
                                   for i, ln in enumerate(lines[1:])]
            filled[-1] = lines[-1]  # one row left blank
            path.write_text("\n".join(filled) + "\n")
            report = import_verdicts(store, path, "carol")
            assert (report.imported, report.blank) == (5, 1)
            again = import_verdicts(store, path, "carol")  # safe to import twice
            assert (again.imported, again.already_judged) == (0, 5)
        else:
            rows = [json.loads(ln) for ln in text.splitlines()]
            for row in rows:
                row["verdict"] = "yes"
            rows[2]["verdict"] = "maybe"
            rows[4]["item_id"] = "no-such-item"
            path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
            with pytest.raises(BadInput) as err:
                import_verdicts(store, path, "dave")
            message = str(err.value)
            assert f"{path}:3: verdict: verdict 'maybe' is not pass or fail" in message
            assert f"{path}:5: item_id: no item 'no-such-item'" in message
            assert f"{path}:7: not JSON" in message and "3 bad row(s)" in message
            assert not [r for r in store.verdict_rows(store.batch_id) if r["reviewer"] == "dave"]
    by_carol = [r for r in store.verdict_rows(store.batch_id) if r["reviewer"] == "carol"]
    assert {r["source"] for r in by_carol} == {"import"}
    assert any(r["comment"] == "too long" and not r["passed"] for r in by_carol)


def test_broken_jsonl_names_the_line(store, tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"item_id": "x", "verdict": "pass"}\n{broken\n')
    with pytest.raises(BadInput, match=r"v.jsonl:2: not JSON"):
        import_verdicts(store, path, "dave")


def test_an_import_records_the_declared_time_and_names_a_bad_one(store, tmp_path):
    path = tmp_path / "timed.jsonl"
    items = [json.loads(ln) for ln in (export_batch(store, store.batch_id, path) and
                                        path.read_text().splitlines())]
    rows = [{**items[0], "verdict": "pass", "seconds": "42"},
            {**items[1], "verdict": "fail", "seconds": ""},
            {**items[2], "verdict": "fail", "seconds": "-3"},
            {**items[3], "verdict": "pass", "seconds": "1e9"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(BadInput) as err:
        import_verdicts(store, path, "erin")
    assert f"{path}:3: seconds: '-3' is not between 0 and 86400" in str(err.value)
    assert f"{path}:4: seconds: '1e9' is not between 0 and 86400" in str(err.value)
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    assert import_verdicts(store, path, "erin").imported == 2
    timed = {r["item_id"]: r["seconds"] for r in store.verdict_rows(store.batch_id)
             if r["reviewer"] == "erin"}
    assert timed == {items[0]["item_id"]: 42.0, items[1]["item_id"]: None}


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(),
                 st.integers(), st.booleans(), st.none()))
def test_parse_seconds_is_total(value):
    """Anything is a time from 0 to a day, blank, or a ValueError naming the value."""
    from rlhf_tasks.panel.offline import parse_seconds

    try:
        seconds = parse_seconds(value)
    except ValueError as exc:
        assert repr(value) in str(exc)
    else:
        assert seconds is None or 0.0 <= seconds <= 86400.0


@given(st.sampled_from(["pass", "PASS", " Yes ", "y", "true", "1", "passed"]))
def test_parse_verdict_pass_words(word):
    assert parse_verdict(word) is True


@given(st.text())
def test_parse_verdict_is_total(text):
    """Any text is pass, fail, blank or a ValueError naming the value; nothing else."""
    try:
        value = parse_verdict(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
    else:
        assert value in (True, False, None)
        assert (value is None) == (text.strip() == "")


def test_oversized_bodies_get_413_and_closed_batches_409(client, store):
    token = store.add_reviewer("ann")
    auth = {"Authorization": f"Bearer {token}"}
    item = client.get(f"/api/batches/{store.batch_id}/next", headers=auth).json()
    huge = {"passed": True, "comment": "x" * 100_000}
    assert client.post(f"/api/items/{item['id']}/verdict", json=huge,
                       headers=auth).status_code == 413

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"passed": true, "comment": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    streamed = client.post(f"/api/items/{item['id']}/verdict", content=chunks(),
                           headers={**auth, "content-type": "application/json"})
    assert streamed.status_code == 413
    assert store.verdict_rows(store.batch_id) == []
    store.close_batch(store.batch_id)
    late = client.post(f"/api/items/{item['id']}/verdict", json={"passed": True},
                       headers=auth)
    assert late.status_code == 409 and "closed" in late.json()["detail"]
    assert client.get(f"/api/batches/{store.batch_id}/next", headers=auth).status_code == 204


def test_revoked_or_expired_tokens_are_refused(client, store):
    token = store.add_reviewer("ann")
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/me", headers=auth).status_code == 200
    store.revoke_reviewer("ann")
    assert client.get("/api/me", headers=auth).status_code == 401


def test_nothing_a_reviewer_reads_carries_the_model_or_its_order(client, store, tmp_path):
    """Every field a reviewer can read, by name: items, batches, verdict replies, exports.
    None names the model, the prompt index, or a time per item."""
    token = store.add_reviewer("ann")
    auth = {"Authorization": f"Bearer {token}"}
    item = client.get(f"/api/batches/{store.batch_id}/next", headers=auth).json()
    assert set(item) == {"id", "batch_id", "prompt", "response", "quality_bar", "simulated"}
    reply = client.post(f"/api/items/{item['id']}/verdict", json={"passed": True},
                        headers=auth).json()
    assert set(reply) == {"id", "item_id", "reviewer", "passed"}
    batch = client.get("/api/batches", headers=auth).json()[0]
    assert not {"model", "models", "prompt_index"} & set(batch)
    out = tmp_path / "export.jsonl"
    export_batch(store, store.batch_id, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # "seconds" is the reviewer's own declared time, to fill in: empty in an export
    assert all(set(r) == {"item_id", "prompt", "response", "quality_bar", "verdict",
                          "comment", "seconds"} and r["seconds"] == "" for r in rows)
    # item ids are random, not a sequence that would follow the generation order
    assert len({r["item_id"] for r in rows}) == len(rows) and all(
        len(r["item_id"]) == 32 for r in rows)
