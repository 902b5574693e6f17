"""The verdict store on SQLite and on the local PostgreSQL: blinding, one verdict per
reviewer and item, concurrent reviewers losing nothing, assignment of work."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from rlhf_tasks.panel.store import AlreadyJudged, PanelStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = (f"sqlite:///{tmp_path}/panel.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    s = PanelStore(url)
    yield s
    s.dispose()


def _items(n_prompts=4, models=("rlhf", "sft")):
    return [{"prompt_index": i, "prompt": f"prompt {i}", "response": f"{m} answer {i}",
             "model": m} for i in range(n_prompts) for m in models]


def _batch(store, k=2, **kw):
    return store.create_batch(pipeline="p", run_id="r1", items=_items(**kw),
                              verdicts_per_item=k, quality_bar="Be good.", simulated=False)


def test_batch_is_blind_shuffled_and_idempotent(store):
    batch = _batch(store)
    assert _batch(store) == batch  # a retried evaluate step finds the same batch
    items = store.items(batch)
    assert len(items) == 8 and all("model" not in i for i in items)
    item = store.next_item(batch, "ann")
    assert "model" not in item.as_dict() and item.quality_bar == "Be good."


def test_batch_order_cannot_be_replayed_from_the_seed(store):
    """The same inputs twice (the same run seed, logged in MLflow) give unrelated orders,
    and neither is the order a seeded shuffle would give."""
    import random

    items = _items(n_prompts=20)  # 40 items
    orders = []
    for run in ("r1", "r2"):
        batch = store.create_batch(pipeline="p", run_id=run, items=items, verdicts_per_item=1,
                                   quality_bar="Be good.", simulated=False)
        orders.append([(i["model"], i["prompt_index"])
                       for i in store.items(batch, with_model=True)])
    assert sorted(orders[0]) == sorted(orders[1]) == sorted((i["model"], i["prompt_index"])
                                                            for i in items)
    assert orders[0] != orders[1]
    assert [m for m, _ in orders[0]] != [m for m, _ in orders[1]]  # models' positions too
    for seed in range(20):
        replay = list(items)
        random.Random(seed).shuffle(replay)
        assert [(r["model"], r["prompt_index"]) for r in replay] not in orders


def test_one_verdict_per_reviewer_and_item(store):
    batch = _batch(store)
    item = store.next_item(batch, "ann")
    store.record_verdict(item.id, "ann", True, "fine")
    with pytest.raises(AlreadyJudged):
        store.record_verdict(item.id, "ann", False)
    store.record_verdict(item.id, "bob", False, source="import")
    rows = store.verdict_rows(batch)
    assert [(r["reviewer"], r["passed"], r["comment"]) for r in rows] == [
        ("ann", True, "fine"), ("bob", False, "")]
    assert {r["model"] for r in rows} <= {"rlhf", "sft"}


def test_next_item_skips_judged_and_spreads_work(store):
    batch = _batch(store, k=2)
    seen = set()
    for _ in range(8):
        item = store.next_item(batch, "ann")
        assert item.id not in seen
        seen.add(item.id)
        store.record_verdict(item.id, "ann", True)
    assert store.next_item(batch, "ann") is None
    # bob is served what ann has judged (k = 2), a reload shows bob the same item
    first = store.next_item(batch, "bob")
    assert store.next_item(batch, "bob").id == first.id
    # carol's first item is not the one bob holds while bob's verdict is pending
    assert store.next_item(batch, "carol").id != first.id
    progress = store.progress(batch, "ann")
    assert progress["verdicts_given"] == 8 and progress["verdicts_needed"] == 16
    assert progress["judged_by_reviewer"] == 8 and not progress["complete"]


def test_concurrent_reviewers_lose_no_verdict(store):
    batch = _batch(store, k=4, n_prompts=10)  # 20 items
    items = [i["id"] for i in store.items(batch)]
    reviewers = [f"r{i}" for i in range(4)]
    refused = []

    def work(name):
        for item in items:
            for _ in range(2):  # every verdict sent twice, as a double click would
                try:
                    store.record_verdict(item, name, hash((item, name)) % 2 == 0,
                                         source="import")
                except AlreadyJudged:
                    refused.append(name)

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.verdict_rows(batch)
    assert len(rows) == len(items) * len(reviewers)
    assert len(refused) == len(items) * len(reviewers)
    assert len({(r["item_id"], r["reviewer"]) for r in rows}) == len(rows)
    progress = store.progress(batch)
    assert progress["complete"] and progress["verdicts_given"] == 80


def test_concurrent_verdicts_never_overfill_an_item(store):
    """Four reviewers import verdicts on every item at once, k = 3: each item keeps
    exactly three, the fourth is refused (counted under the lock, not before it)."""
    from rlhf_tasks.panel.store import NotServed

    batch = _batch(store, k=3, n_prompts=10)
    items = [i["id"] for i in store.items(batch)]
    refused = []

    def work(name):
        for item in items:
            try:
                store.record_verdict(item, name, True, source="import")
            except NotServed:
                refused.append((item, name))

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_item = {}
    for row in store.verdict_rows(batch):
        per_item[row["item_id"]] = per_item.get(row["item_id"], 0) + 1
    assert set(per_item.values()) == {3} and len(per_item) == len(items)
    assert len(refused) == len(items)


def test_a_reviewer_judges_only_what_they_were_served(store):
    """A member who knows item ids (an export, a colleague's screen) cannot pick them: a
    verdict needs the store to have served that item to that reviewer."""
    from rlhf_tasks.panel.store import NotServed

    batch = _batch(store, k=2)
    served = store.next_item(batch, "ann")
    other = next(i["id"] for i in store.items(batch) if i["id"] != served.id)
    with pytest.raises(NotServed, match="not served"):
        store.record_verdict(other, "ann", True)
    with pytest.raises(NotServed, match="not served"):
        store.record_verdict(served.id, "bob", True)
    store.record_verdict(served.id, "ann", True)
    assert len(store.verdict_rows(batch)) == 1


def test_the_runs_own_people_may_not_judge_its_batch(store):
    """Whoever triggered the run (by name and id) and its approver are excluded: they are
    served nothing, and a verdict from them is refused, even an import."""
    from rlhf_tasks.panel.store import ConflictOfInterest

    batch = store.create_batch(pipeline="p", run_id="coi", items=[
        {"prompt_index": 0, "prompt": "q", "response": "a", "model": "m"}],
        verdicts_per_item=1, quality_bar="bar", simulated=False,
        excluded=["trig", "7", None, "approver"])
    item = store.items(batch)[0]["id"]
    for who in ("trig", "7", "approver"):
        with pytest.raises(ConflictOfInterest):
            store.next_item(batch, who)
        with pytest.raises(ConflictOfInterest):
            store.record_verdict(item, who, True, source="import")
    assert store.next_item(batch, "ann").id == item


def test_reviewer_tokens_are_hashed(store):
    token = store.add_reviewer("ann")
    assert store.reviewer_for_token(token) == "ann"
    assert store.reviewer_for_token("nope") is None and store.reviewer_for_token("") is None
    with store.session() as s:
        from rlhf_tasks.panel.store import Reviewer

        assert s.get(Reviewer, "ann").token_sha256 != token
    new = store.add_reviewer("ann")  # re-keying revokes the old token
    assert store.reviewer_for_token(token) is None and store.reviewer_for_token(new) == "ann"


def test_work_spreads_so_every_reviewer_can_finish_the_batch(store):
    """k = 2, 12 items, 3 reviewers taking 8 each in turn: every item reaches quorum
    (served by fewest verdicts first, not in a fixed order)."""
    batch = _batch(store, k=2, n_prompts=6)
    for name in ("ann", "bob", "cara"):
        for _ in range(8):
            item = store.next_item(batch, name)
            assert item is not None, name
            store.record_verdict(item.id, name, True)
    assert store.progress(batch)["complete"]


def test_items_held_up_to_quorum_are_not_served_to_others(store):
    """k = 1, two items: while ann and bob each hold one (verdicts pending), cara is served
    nothing rather than a verdict beyond quorum; when a hold's lease expires, its item is
    free again."""
    from sqlalchemy import update

    from rlhf_tasks.panel import store as store_mod

    batch = _batch(store, k=1, n_prompts=1)  # 2 items
    ann = store.next_item(batch, "ann")
    bob = store.next_item(batch, "bob")
    assert ann.id != bob.id
    assert store.next_item(batch, "cara") is None
    assert store.next_item(batch, "ann").id == ann.id  # a reload shows ann her item again
    expired = store_mod._now() - store_mod.ASSIGNMENT_LEASE - timedelta(seconds=1)
    with store.session() as s:
        s.execute(update(store_mod.Assignment).where(store_mod.Assignment.reviewer == "ann")
                  .values(assigned_at=expired))
        s.commit()
    assert store.next_item(batch, "cara").id == ann.id


def test_concurrent_reviewers_waste_almost_no_verdicts(store):
    """8 reviewers in threads, each serving and judging until nothing is left: every item
    reaches quorum and the verdicts stay within a few percent of items x k."""
    batch = _batch(store, k=3, n_prompts=20)  # 40 items
    errors = []

    def work(name):
        try:
            while (item := store.next_item(batch, name)) is not None:
                store.record_verdict(item.id, name, True)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    progress = store.progress(batch)
    assert progress["complete"], progress
    assert progress["verdicts_given"] <= 40 * 3 * 1.05, progress


def test_a_closed_batch_takes_no_more_verdicts(store):
    """The gate closes the batch: a later verdict is refused, nothing more is served, and
    a retried gate reads the same verdicts."""
    from rlhf_tasks.panel.store import BatchClosed

    batch = _batch(store, k=2)
    item = store.next_item(batch, "ann")
    store.record_verdict(item.id, "ann", True)
    closed = store.close_batch(batch)
    snapshot = store.verdict_rows(batch)
    other = store.items(batch)[1]["id"]
    with pytest.raises(BatchClosed, match="closed"):
        store.record_verdict(other, "bob", False)
    assert store.next_item(batch, "bob") is None
    assert store.close_batch(batch) == closed  # idempotent: a retried gate
    assert store.verdict_rows(batch) == snapshot and len(snapshot) == 1


def test_reviewer_tokens_expire_and_can_be_revoked(store):
    from sqlalchemy import update

    from rlhf_tasks.panel import store as store_mod

    token = store.add_reviewer("ann", valid_days=1)
    assert store.reviewer_for_token(token) == "ann" and store.is_member("ann")
    with store.session() as s:
        s.execute(update(store_mod.Reviewer).where(store_mod.Reviewer.name == "ann")
                  .values(token_expires_at=store_mod._now() - timedelta(seconds=1)))
        s.commit()
    assert store.reviewer_for_token(token) is None  # expired
    fresh = store.add_reviewer("ann")
    assert store.reviewer_for_token(fresh) == "ann"
    assert store.revoke_reviewer("ann") and not store.is_member("ann")
    assert store.reviewer_for_token(fresh) is None  # revoked at once
    assert not store.revoke_reviewer("nobody")
    assert store.add_reviewer("dan", with_token=False) is None and store.is_member("dan")


def test_a_store_made_by_an_older_release_gains_the_new_columns(tmp_path):
    """Columns added since (batch closing, token expiry) are added in place; the data stays."""
    import sqlalchemy

    url = f"sqlite:///{tmp_path}/old.db"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(
            "CREATE TABLE review_batches (id VARCHAR(32) PRIMARY KEY, pipeline VARCHAR(200), "
            "run_id VARCHAR(250), created_at DATETIME, verdicts_per_item INTEGER, "
            "quality_bar TEXT, simulated BOOLEAN)"))
        conn.execute(sqlalchemy.text(
            "CREATE TABLE reviewers (name VARCHAR(100) PRIMARY KEY, token_sha256 VARCHAR(64), "
            "simulated BOOLEAN, created_at DATETIME)"))
        conn.execute(sqlalchemy.text(
            "INSERT INTO review_batches VALUES ('b1', 'p', 'r', '2026-01-01 00:00:00', 2, "
            "'bar', 0)"))
    engine.dispose()
    store = PanelStore(url)
    try:
        assert store.batch("b1").closed_at is None
        store.close_batch("b1")
        assert store.batch("b1").closed_at is not None
    finally:
        store.dispose()


def test_expert_time_is_measured_from_serving_capped_and_kept_apart(store):
    """A verdict's time runs from the item's first serving to that reviewer (a reload does
    not restart it) to the verdict, on the store's clock, at most the batch's idle cap; a
    simulated rater has none, an offline import what it declares."""
    from datetime import datetime, timezone

    from rlhf_tasks.panel.store import Assignment

    batch = store.create_batch(pipeline="p", run_id="t", items=_items(n_prompts=2),
                               verdicts_per_item=1, quality_bar="bar", simulated=False,
                               idle_cap_seconds=120)

    def served_ago(item_id, reviewer, seconds):
        with store.session() as s:
            row = s.get(Assignment, (item_id, reviewer))
            row.served_at = datetime.now(timezone.utc) - timedelta(seconds=seconds)
            s.commit()

    first = store.next_item(batch, "ann")
    served_ago(first.id, "ann", 90)
    assert store.next_item(batch, "ann").id == first.id  # a reload: the clock runs on
    store.record_verdict(first.id, "ann", True)
    idle = store.next_item(batch, "ann")
    served_ago(idle.id, "ann", 7200)  # left open for two hours
    store.record_verdict(idle.id, "ann", False)
    bot = store.next_item(batch, "sim")
    store.record_verdict(bot.id, "sim", True, source="simulated")
    items = [i["id"] for i in store.items(batch)]
    store.record_verdict(items[-1] if items[-1] not in (first.id, idle.id, bot.id)
                         else items[0], "carl", True, source="import", seconds=45.5)
    seconds = {r["reviewer"] + ("-idle" if r["item_id"] == idle.id else ""): r["seconds"]
               for r in store.verdict_rows(batch)}
    assert 88 <= seconds["ann"] <= 93, seconds  # the store's clock has whole seconds on SQLite
    assert seconds["ann-idle"] == 120.0
    assert seconds["sim"] is None and seconds["carl"] == 45.5
