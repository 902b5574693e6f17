"""The sequential panel: curtailed items, the e-values, the final look's counts (exact, by
enumeration), the type-I bound by simulation through the real ``evaluate``, the store's
serving order and its close on decision, the gate's use of it, and reviewers over HTTP
who get no more items once it has decided."""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_tasks.panel import sequential as sq

ROOT = Path(__file__).resolve().parents[1]


# -- items -----------------------------------------------------------------------------------
@pytest.mark.parametrize("votes,k,expected", [
    ([], 3, None), ([True], 3, None), ([True, True], 3, True), ([False, False], 3, False),
    ([True, False], 3, None), ([True, False, True], 3, True), ([True, False, False], 3, False),
    # an even k: a tie fails, so k/2 failures settle it, k/2 + 1 passes do
    ([False, False], 4, False), ([True, True], 4, None), ([True, True, True], 4, True),
    ([True], 1, True), ([False], 1, False),
    # only the first k count
    ([True, True, False, False], 3, True),
])
def test_an_item_is_settled_once_the_rest_cannot_change_its_majority(votes, k, expected):
    assert sq.item_outcome(votes, k) is expected


@pytest.mark.parametrize("passes,fails,k,expected", [
    (0, 0, 3, 2), (1, 0, 3, 1), (1, 1, 3, 1), (2, 0, 3, 0), (0, 0, 4, 2), (0, 0, 5, 3),
    (0, 0, 1, 1)])
def test_votes_to_settle(passes, fails, k, expected):
    assert sq.votes_to_settle(passes, fails, k) == expected


# -- e-values and counts ---------------------------------------------------------------------
def test_the_early_e_value_is_the_mixture_integral():
    high = sq.HIGH
    # B = 10, W = 0: 2^10 * integral over [1/2, high] of q^10 dq / (high - 1/2)
    assert math.exp(sq.log_e_better(10, 0)) == pytest.approx(
        2**10 * (high**11 - 0.5**11) / 11 / (high - 0.5), rel=1e-9)
    # B = 1, W = 1: 4 * integral of q(1-q) = 4 * [q^2/2 - q^3/3] over [1/2, high]
    def antiderivative(q):
        return q**2 / 2 - q**3 / 3
    assert math.exp(sq.log_e_better(1, 1)) == pytest.approx(
        4 * (antiderivative(high) - antiderivative(0.5)) / (high - 0.5), rel=1e-9)
    assert math.exp(sq.log_e_better(0, 0)) == pytest.approx(1.0)


def test_the_futility_e_value_is_the_mixture_integral():
    q1, low = 0.65, 0.25
    # B = 0, W = 3: integral over [low, q1] of (1-q)^3 dq / (q1 - low) / (1-q1)^3
    integral = ((1 - low) ** 4 - (1 - q1) ** 4) / 4
    assert math.exp(sq.log_e_futile(0, 3, q1)) == pytest.approx(
        integral / (q1 - low) / (1 - q1) ** 3, rel=1e-9)
    assert math.exp(sq.log_e_futile(0, 0, q1)) == pytest.approx(1.0)


def test_the_fixed_panels_counts_are_the_exact_mcnemar_test():
    # n = 5: P(X >= 5) = 1/32 < 0.05; n = 10: P(X >= 9) = 11/1024 < 0.05 <= P(X >= 8) = 56/1024
    assert sq.fixed_critical(5, 0.05) == 5
    assert sq.fixed_critical(10, 0.05) == 9
    assert sq.fixed_critical(4, 0.05) == math.inf  # 1/16 > 0.05: no count is enough


@pytest.mark.parametrize("alpha_e", [0.025, 0.045])
def test_early_looks_and_the_final_count_together_keep_alpha_by_enumeration(alpha_e):
    """Every sequence of n fair coins: promoted if E crossed on the way or the final count
    reaches c(n); the share of such sequences is at most alpha."""
    alpha = 0.05
    counts = sq.critical_counts(12, alpha, alpha_e)
    bound = math.log(1 / alpha_e)
    for n in range(1, 13):
        promoted = 0
        for flips in itertools.product((0, 1), repeat=n):
            b = w = 0
            crossed = False
            for f in flips:
                b, w = b + f, w + (1 - f)
                crossed |= sq.log_e_better(b, w) >= bound
            promoted += crossed or b >= counts[n]
        assert promoted / 2**n <= alpha + 1e-12, n
        # and c(n) is the smallest count that keeps it so
        if counts[n] <= n:
            looser = sum(1 for flips in itertools.product((0, 1), repeat=n)
                         if any(sq.log_e_better(sum(flips[:m]), m - sum(flips[:m])) >= bound
                                for m in range(1, n + 1)) or sum(flips) >= counts[n] - 1)
            assert looser / 2**n > alpha, n


def test_the_slack_alpha_leaves_every_final_count_at_the_fixed_panels():
    for prompts in (20, 60, 150):
        alpha_e = sq.slack_alpha(prompts, 0.05)
        assert 0 < alpha_e <= 0.05 / 2
        counts = sq.critical_counts(prompts, 0.05, alpha_e)
        assert all(c == sq.fixed_critical(n, 0.05) for n, c in enumerate(counts) if n)


# -- the state -------------------------------------------------------------------------------
def _plan(prompts: int, **kw) -> sq.SequentialPlan:
    return sq.SequentialPlan(candidate="rlhf", reference="champion",
                             order=tuple(range(prompts)), k=3, significance=0.05, **kw)


def _rows(outcomes: dict[str, list[bool]], k: int = 3, disagree_every: int = 0) -> list[dict]:
    """Verdict rows whose curtailed majority is ``outcomes``; every ``disagree_every``-th
    item takes three verdicts (the first two disagree)."""
    rows, next_id = [], 1
    for model, results in outcomes.items():
        for p, passed in enumerate(results):
            votes = [passed, passed]
            if disagree_every and p % disagree_every == 0:
                votes = [passed, not passed, passed]
            for v in votes:
                rows.append({"id": next_id, "item_id": f"{model}-{p}", "model": model,
                             "prompt_index": p, "passed": v, "reviewer": f"r{next_id % 4}"})
                next_id += 1
    return rows


def test_a_clearly_better_candidate_is_promoted_early():
    plan = _plan(60, min_prompts=20)
    rows = _rows({"rlhf": [True] * 25, "champion": [False] * 25})
    state = sq.evaluate(plan, rows, items_in_batch=120)
    assert state.decided and state.promote_worthy and state.look == "early"
    assert state.prompts_decided == 25 and (state.better, state.worse) == (25, 0)
    assert state.verdicts_used == 100 and state.verdicts_fixed == 360


def test_no_early_stop_before_the_minimum_prompts():
    plan = _plan(60, min_prompts=20)
    state = sq.evaluate(plan, _rows({"rlhf": [True] * 19, "champion": [False] * 19}),
                        items_in_batch=120)
    assert not state.decided and state.look == "open"


def test_the_decided_prefix_stops_at_the_first_unsettled_prompt():
    plan = _plan(60, min_prompts=1)
    rows = _rows({"rlhf": [True] * 30, "champion": [False] * 30})
    # prompt 3's champion answer has one verdict only: the prefix is prompts 0..2
    rows = [r for r in rows if not (r["model"] == "champion" and r["prompt_index"] == 3)]
    rows.append({"id": 10_000, "item_id": "champion-3", "model": "champion",
                 "prompt_index": 3, "passed": False, "reviewer": "r1"})
    state = sq.evaluate(plan, rows, items_in_batch=120)
    assert state.prompts_decided == 3


def test_a_worse_candidate_stops_for_futility_and_is_never_promote_worthy():
    plan = _plan(100, min_prompts=20)
    state = sq.evaluate(plan, _rows({"rlhf": [False] * 20 + [True] * 5,
                                     "champion": [True] * 25}), items_in_batch=200)
    assert state.decided and not state.promote_worthy and state.look == "futility"


def test_the_policy_out_of_reach_stops_at_once():
    # 10 prompts, minimum pass rate 0.8: after 3 failures the best is 7/10
    plan = _plan(10, min_pass_rate=0.8, min_prompts=5)
    state = sq.evaluate(plan, _rows({"rlhf": [False] * 3, "champion": [False] * 3}),
                        items_in_batch=20)
    assert state.decided and state.look == "futility" and "pass rate" in state.reason


def test_the_final_look_is_the_fixed_test_when_the_slack_allows():
    plan = _plan(12, min_prompts=100)  # never early: the final look decides
    # 12 prompts, 6 discordant, all for the candidate: fixed c(6) = 6 (1/64 < 0.05)
    cand = [True] * 6 + [True] * 6
    champ = [False] * 6 + [True] * 6
    state = sq.evaluate(plan, _rows({"rlhf": cand, "champion": champ}), items_in_batch=24)
    assert state.look == "final" and state.critical == sq.fixed_critical(6, 0.05) == 6
    assert state.promote_worthy


def test_the_deadline_look_needs_e_at_one_over_alpha():
    plan = _plan(100, min_prompts=1000)
    rows = _rows({"rlhf": [True] * 8, "champion": [False] * 8})
    state = sq.evaluate(plan, rows, items_in_batch=200, final=True)
    e = math.exp(sq.log_e_better(8, 0))
    assert state.look == "deadline" and state.promote_worthy == (e >= 20)


def _simulated_rows(rng: random.Random, prompts: int, p_champ: float, lift: float):
    """Verdict rows of a noisy panel, k = 3, each item's verdicts in order."""
    rows, next_id = [], 1
    for p in range(prompts):
        u = rng.random()
        v = u if rng.random() < 0.5 else rng.random()
        for model, true in (("champion", u < p_champ), ("rlhf", v < p_champ + lift)):
            for _ in range(3):
                rows.append({"id": next_id, "item_id": f"{model}-{p}", "model": model,
                             "prompt_index": p, "reviewer": f"r{next_id}",
                             "passed": true != (rng.random() < 0.08)})
                next_id += 1
    return rows


def _run_sequentially(plan, rows) -> tuple[bool, int]:
    """Looks after each prompt, as the store does after each verdict; (promoted, used)."""
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    seen: list[dict] = []
    for p in plan.order:
        for model in ("rlhf", "champion"):
            item = [r for r in by_prompt[p] if r["model"] == model]
            for r in item:  # curtailed: stop once the item is settled
                seen.append(r)
                if sq.item_outcome([x["passed"] for x in seen if x["item_id"] == r["item_id"]],
                                   plan.k) is not None:
                    break
        state = sq.evaluate(plan, seen, items_in_batch=2 * len(plan.order))
        if state.decided:  # the gate checks the policy's point rules too
            return state.promote_worthy and state.policy_ok, state.verdicts_used
    raise AssertionError("the final look always decides")


def test_type_one_error_at_most_alpha_by_simulation():
    """No lift: the real evaluate, looking after every prompt, promotes at most alpha of the
    time (400 replicates: the bound plus three standard errors)."""
    rng = random.Random(7)
    plan = _plan(40, min_prompts=10)
    promoted = sum(_run_sequentially(plan, _simulated_rows(rng, 40, 0.6, 0.0))[0]
                   for _ in range(400))
    assert promoted / 400 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)


def test_the_benchmark_decides_as_evaluate_does():
    """benchmarks/panel_sequential.py vectorises the procedure; replicate by replicate it
    promotes and counts verdicts as sequential.evaluate does."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import panel_sequential as bench

    args = bench.parse_args(["--reps", "40", "--prompts", "30", "--min-prompts", "8"])
    plan = bench.plan_for(args)
    tables = bench.Tables(plan)
    rng = np.random.default_rng(3)
    for lift in (-10.0, 5.0, 20.0):
        verdicts = bench.simulate_verdicts(args, lift, rng)
        cand, cand_used = bench.item_outcomes(verdicts["candidate"], args.k)
        champ, champ_used = bench.item_outcomes(verdicts["champion"], args.k)
        promoted, used = bench.sequential_panel(plan, cand, champ, cand_used + champ_used,
                                                tables)
        real = sq.SequentialPlan(**{**plan.as_json(), "candidate": "rlhf",
                                    "reference": "champion", "order": plan.order})
        for rep in range(args.reps):
            rows, next_id = [], 1
            for p in range(args.prompts):
                for model, name in (("candidate", "rlhf"), ("champion", "champion")):
                    for v in verdicts[model][rep, p]:
                        rows.append({"id": next_id, "item_id": f"{name}-{p}", "model": name,
                                     "prompt_index": p, "passed": bool(v), "reviewer": "x"})
                        next_id += 1
            got, n = _run_sequentially(real, rows)
            assert (got, n) == (bool(promoted[rep]), int(used[rep])), (lift, rep)


def test_the_benchmark_prints_its_verdict_lines():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import contextlib
    import io

    import panel_sequential as bench

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(["--reps", "50", "--prompts", "40", "--lifts", "0", "10"])
    lines = out.getvalue().strip().splitlines()
    assert lines[-2].startswith("fixed: type-I ") and lines[-2].endswith("100% of fixed")
    assert lines[-1].startswith("sequential: type-I ") and "% of fixed" in lines[-1]


# -- the store -------------------------------------------------------------------------------
def _batch(store, prompts: int, *, models=("rlhf", "champion", "sft"), **plan):
    items = [{"prompt_index": p, "prompt": f"prompt {p}", "response": f"{m} answers {p}",
              "model": m} for p in range(prompts) for m in models]
    return store.create_batch(
        pipeline="rlhf_tuning", run_id="run-1", items=items, verdicts_per_item=3,
        quality_bar="bar", simulated=False,
        sequential={"candidate": "rlhf", "reference": "champion", "k": 3,
                    "significance": 0.05, "min_pass_rate": 0.5, "min_lift": 0.0,
                    "min_prompts": 10, **plan})


def _model(store, item_id: str) -> tuple[str, int]:
    found = next(i for i in store.items(store.batches()[0].id, with_model=True)
                 if i["id"] == item_id)
    return found["model"], found["prompt_index"]


def test_the_store_serves_a_prompt_s_two_answers_before_the_next_and_curtails(tmp_path):
    from rlhf_tasks.panel.store import NotServed, PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    batch_id = _batch(store, 30)
    plan = store.batch(batch_id).plan
    for name in ("ann", "bob", "cara"):
        store.add_reviewer(name)
    # ann and bob take turns: the first prompt's two decision items, each to both of them
    served = []
    for name in ("ann", "bob", "ann", "bob"):
        item = store.next_item(batch_id, name)
        served.append((name, *_model(store, item.id), item.id))
        store.record_verdict(item.id, name, True)
    first = plan.order[0]
    assert {(m, p) for _, m, p, _ in served} == {("rlhf", first), ("champion", first)}
    # both passed each item: settled, so cara is served the next prompt, not a third verdict
    item = store.next_item(batch_id, "cara")
    assert _model(store, item.id)[1] == plan.order[1]
    with pytest.raises(NotServed, match="settled"):
        store.record_verdict(served[0][3], "cara", False, source="import")
    # the baseline's items are never served
    models = set()
    for _ in range(40):
        item = store.next_item(batch_id, "cara")
        if item is None:
            break
        models.add(_model(store, item.id)[0])
        store.record_verdict(item.id, "cara", True)
    assert "sft" not in models


def test_a_disagreement_brings_a_third_reviewer(tmp_path):
    from rlhf_tasks.panel.store import PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    batch_id = _batch(store, 30)
    for name in ("ann", "bob", "cara"):
        store.add_reviewer(name)
    item = store.next_item(batch_id, "ann")
    store.record_verdict(item.id, "ann", True)
    same = store.next_item(batch_id, "bob")
    while same.id != item.id:  # bob may be served the prompt's other answer first
        store.record_verdict(same.id, "bob", True)
        same = store.next_item(batch_id, "bob")
    store.record_verdict(item.id, "bob", False)
    third = store.next_item(batch_id, "cara")
    seen = set()
    while third.id != item.id:
        seen.add(third.id)
        store.record_verdict(third.id, "cara", True)
        third = store.next_item(batch_id, "cara")
    assert third.id == item.id  # the 1-1 item goes to a third reviewer


def _judge_all(store, batch_id, reviewers, quality) -> int:
    """Reviewers take turns until none is served anything; returns the verdicts."""
    given, active = 0, list(reviewers)
    while active:
        for name in list(active):
            item = store.next_item(batch_id, name)
            if item is None:
                active.remove(name)
                continue
            model, _ = _model(store, item.id)
            store.record_verdict(item.id, name, quality[model])
            given += 1
    return given


def test_the_batch_closes_itself_once_decided_and_takes_no_more_verdicts(tmp_path):
    from rlhf_tasks.panel.store import BatchClosed, PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    batch_id = _batch(store, 60)
    reviewers = ("ann", "bob", "cara", "dan")
    for name in reviewers:
        store.add_reviewer(name)
    given = _judge_all(store, batch_id, reviewers, {"rlhf": True, "champion": False})
    batch = store.batch(batch_id)
    assert batch.closed_at is not None
    progress = store.progress(batch_id)
    assert progress["complete"] and progress["sequential"]["decided"]
    assert progress["sequential"]["look"] == "early"
    # the first prompt (from the tenth) where E(m, 0) reaches 1/alpha_e settles it: two
    # agreeing verdicts on each of its 2m items (alpha_e = 0.005 for 60 prompts: m = 14)
    alpha_e = batch.plan.alpha_e
    m = next(m for m in range(10, 60) if sq.log_e_better(m, 0) >= math.log(1 / alpha_e))
    assert (alpha_e, m) == (pytest.approx(0.005), 14)
    assert given == 4 * m == progress["sequential"]["verdicts_used"]
    assert progress["sequential"]["verdicts_fixed"] == 60 * 3 * 3
    leftover = next(i for i in store.items(batch_id, with_model=True) if i["model"] == "sft")
    with pytest.raises(BatchClosed):
        store.record_verdict(leftover["id"], "ann", True, source="import")
    state = store.sequential_state(batch_id)
    assert state.promote_worthy and state.better == m and state.worse == 0


def test_an_open_sequential_batch_tells_reviewers_nothing_of_the_comparison(tmp_path):
    from rlhf_tasks.panel.store import PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    batch_id = _batch(store, 60)
    store.add_reviewer("ann")
    item = store.next_item(batch_id, "ann")
    store.record_verdict(item.id, "ann", True)
    seq = store.progress(batch_id, "ann")["sequential"]
    assert set(seq) == {"decided", "prompts", "prompts_decided", "verdicts_used",
                        "verdicts_fixed"}
    assert not any(m in str(seq) for m in ("rlhf", "champion"))


def test_the_gate_decides_on_the_sequential_state():
    from rlhf_tasks.panel.aggregate import aggregate
    from rlhf_tasks.panel.gate import GatePolicy, decide

    plan = _plan(60, min_prompts=10)
    rows = _rows({"rlhf": [True] * 20, "champion": [False] * 20}, disagree_every=4)
    state = sq.evaluate(plan, rows, items_in_batch=180)
    assert state.look == "early"
    result = aggregate(rows, 3, curtailed=True)
    assert result.scores["rlhf"].items == 20 and result.scores["champion"].pass_rate == 0.0
    # kappa on each item's first two verdicts: the 1-1 items disagree
    assert result.kappa is not None and result.kappa < 1
    decision = decide(result, GatePolicy(0.5, 0.0, 0.05), "rlhf", "champion", sequential=state)
    assert decision.promote, decision.reasons
    futile = sq.evaluate(_plan(100, min_prompts=10),
                         _rows({"rlhf": [False] * 20, "champion": [True] * 20}),
                         items_in_batch=200)
    result = aggregate(_rows({"rlhf": [False] * 20, "champion": [True] * 20}), 3,
                       curtailed=True)
    decision = decide(result, GatePolicy(0.0, -1.0, 0.05), "rlhf", "champion",
                      sequential=futile)
    assert not decision.promote
    assert any("sequential panel found no significant lift" in r for r in decision.reasons)


def test_reviewers_over_http_get_no_more_items_once_the_panel_decided(tmp_path):
    """The standalone review app over real HTTP on PostgreSQL-free SQLite: three reviewers
    fetch and judge until the app answers 204; the batch closed itself long before a fixed
    panel's verdicts, and a late verdict is refused."""
    import httpx

    from conftest import review_server
    from rlhf_tasks.panel.store import PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    batch_id = _batch(store, 40, models=("rlhf", "champion"))
    tokens = {name: store.add_reviewer(name) for name in ("ann", "cara", "dan")}
    quality = {"rlhf": True, "champion": False}
    with review_server(store) as base, httpx.Client(base_url=base, timeout=30) as http:
        given, held = 0, None
        active = dict(tokens)
        while active:
            for name, token in list(active.items()):
                headers = {"Authorization": f"Bearer {token}"}
                response = http.get(f"api/batches/{batch_id}/next", headers=headers)
                if response.status_code == 204:
                    del active[name]
                    continue
                item = response.json()
                model = "rlhf" if item["response"].startswith("rlhf") else "champion"
                if name == "dan" and held is None:
                    held = item["id"]  # dan keeps one item open and answers it late
                    continue
                posted = http.post(f"api/items/{item['id']}/verdict", headers=headers,
                                   json={"passed": quality[model], "comment": ""})
                assert posted.status_code == 201, posted.text
                given += 1
        progress = http.get(f"api/batches/{batch_id}/progress",
                            headers={"Authorization": f"Bearer {tokens['ann']}"}).json()
        assert progress["complete"] and progress["sequential"]["decided"]
        assert progress["sequential"]["verdicts_used"] == given < 40 * 2 * 3 / 2
        late = http.post(f"api/items/{held}/verdict", json={"passed": True, "comment": ""},
                         headers={"Authorization": f"Bearer {tokens['dan']}"})
        assert late.status_code == 409 and "closed" in late.text
