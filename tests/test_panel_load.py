"""The panel under load: 24 reviewers over HTTP on one PostgreSQL-backed batch of 200
items with k = 3 (the figures of the trust issue).  Every item reaches quorum, nothing is
lost or counted twice, and verdicts stay within a few percent of items x k: an item
already held up to k by others is not served (experts' time is the costliest input)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import review_server

pytestmark = pytest.mark.e2e
REVIEWERS, PROMPTS, MODELS, K = 24, 100, ("a", "b"), 3


def test_24_reviewers_over_http_waste_almost_no_verdicts(postgres_url):
    import httpx

    from rlhf_tasks.panel.store import PanelStore

    store = PanelStore(postgres_url)
    items = [{"prompt_index": i, "prompt": f"prompt {i}", "response": f"{m} answer {i}",
              "model": m} for i in range(PROMPTS) for m in MODELS]
    batch = store.create_batch(pipeline="p", run_id="load", items=items, verdicts_per_item=K,
                               quality_bar="bar", simulated=False)
    tokens = {f"r{i:02d}": store.add_reviewer(f"r{i:02d}") for i in range(REVIEWERS)}
    errors, given = [], {}
    try:
        with review_server(store) as base:
            def review(name: str) -> None:
                headers = {"Authorization": f"Bearer {tokens[name]}"}
                count = 0
                try:
                    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                        while (r := http.get(f"api/batches/{batch}/next")).status_code == 200:
                            item = r.json()
                            posted = http.post(f"api/items/{item['id']}/verdict",
                                               json={"passed": count % 2 == 0})
                            if posted.status_code != 201:
                                errors.append((name, posted.status_code, posted.text))
                                return
                            count += 1
                        assert r.status_code == 204, r.text
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append((name, repr(exc)))
                given[name] = count

            started = time.perf_counter()
            threads = [threading.Thread(target=review, args=(n,)) for n in tokens]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            seconds = time.perf_counter() - started
        assert errors == [] and len(given) == REVIEWERS, errors[:5]
        progress = store.progress(batch)
        rows = store.verdict_rows(batch)
    finally:
        store.dispose()
    needed = PROMPTS * len(MODELS) * K
    assert progress["complete"] and progress["items_complete"] == PROMPTS * len(MODELS)
    assert len(rows) == sum(given.values())  # nothing lost, nothing counted twice
    assert len({(r["item_id"], r["reviewer"]) for r in rows}) == len(rows)
    assert len(rows) <= needed * 1.03, f"{len(rows)} verdicts for {needed} needed"
    print(f"\n{REVIEWERS} reviewers, {PROMPTS * len(MODELS)} items, k={K}: {len(rows)} verdicts "
          f"({len(rows) / needed - 1:+.1%} over quorum) in {seconds:.1f} s, "
          f"{2 * len(rows) / seconds:.0f} requests/s")
