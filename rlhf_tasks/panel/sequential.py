"""The sequential panel: decide candidate against champion as soon as the verdicts settle it.

A fixed panel judges every item k times and then runs the exact McNemar test.  The
sequential panel judges the same items in an order fixed in advance (a random order of
the prompts; both models' answers to a prompt before the next prompt) and looks after
every verdict.  Three savings, none of which lets a wrong promotion through more often
than the configured significance:

1. **Curtailed items.**  An item's majority of k is settled once more than half of k
   verdicts agree (k = 3: two agreeing verdicts); the third is not asked for.  The item's
   verdict is the majority of its first k verdicts either way.
2. **Early promotion.**  The discordant prompts (one model passed, the other failed) of
   the decided prefix are a sequence of coin flips; the candidate is better when its
   side comes up with chance q > 1/2.  The mixture likelihood ratio

       E(B, W) = integral over q in [1/2, HIGH] of (2q)^B (2(1-q))^W dq / (HIGH - 1/2)

   (B prompts only the candidate passed, W only the champion; HIGH = 0.85, the range of
   lifts a tuning run gives) is a nonnegative supermartingale under every q <= 1/2, so
   by Ville's inequality it ever reaches 1/alpha_e with chance at most alpha_e (Ramdas et
   al. 2023, "Game-theoretic statistics and safe anytime-valid inference").  The panel
   may stop the moment it does.
3. **Stopping when the policy is out of reach.**  The mirror image, a mixture over
   q in [0.25, q1] against q1 (``futility_q``), is a supermartingale under every q >= q1:
   when it reaches 1/beta the candidate is very unlikely to be q1-better, and the panel
   stops; a candidate that is at least q1-better is stopped so with chance at most beta.
   The panel also stops when no outcome of the remaining prompts could meet the policy.
   Stopping for futility only removes promotions, so it cannot raise the type-I error.

When every decision item is decided without an early stop, the final look promotes on
B >= c(n): the smallest count such that, with n discordant prompts and fair coins,
P(E crossed 1/alpha_e on the way, or B >= c(n)) < alpha, computed exactly by dynamic
programming over the coin-flip paths.  So the whole procedure promotes a candidate that
is not better with chance below ``alpha`` (conditionally on n, hence overall).  alpha_e
is the largest share of alpha that leaves every c(n) at the fixed panel's exact McNemar
count (:func:`slack_alpha`): the early looks spend only what the discreteness of that
test leaves unspent, and the final look promotes whenever the fixed panel would.  A
batch closed by its deadline before the final look can only promote on E >= 1/alpha,
which Ville's inequality also covers.

Pure functions on plain data: the store calls :func:`evaluate` after every verdict; the
gate calls it on the closed batch; ``benchmarks/panel_sequential.py`` simulates it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

HIGH = 0.85  # the early look's mixture: q uniform on [1/2, HIGH]


@dataclass(frozen=True)
class SequentialPlan:
    """What the sequential panel decides and how, fixed when the batch is made."""
    candidate: str
    reference: str               # the model the candidate must beat (champion or base)
    order: tuple[int, ...]       # prompt indices in serving order (random, fixed)
    k: int                       # verdicts per item
    significance: float          # alpha: the type-I bound of the whole procedure
    min_pass_rate: float = 0.0
    min_lift: float = 0.0
    expert: str | None = None    # the experts' reference rows, when the gap rule is on
    max_gap: float | None = None
    early_alpha: float | None = None  # alpha_e; None: the slack of the exact test
    futility_q: float = 0.65     # the futility look's alternative q1
    futility_beta: float = 0.1   # ... and its level
    min_prompts: int = 20        # no early stop before this many prompts are decided

    def __post_init__(self):
        if self.early_alpha is not None and not 0 < self.early_alpha < self.significance:
            raise ValueError("the early looks' alpha_e must lie between 0 and the "
                             "significance: Ville's inequality bounds their crossing by it")
        if not 0.5 < self.futility_q < 1 or not 0 < self.futility_beta < 1:
            raise ValueError("futility_q lies in (1/2, 1) and futility_beta in (0, 1)")

    @property
    def models(self) -> tuple[str, ...]:
        """The models whose items the decision needs (served; the rest are not)."""
        return (self.candidate, self.reference) + ((self.expert,) if self.expert else ())

    @property
    def alpha_e(self) -> float:
        if self.early_alpha is not None:
            return self.early_alpha
        return slack_alpha(len(self.order), self.significance)

    def as_json(self) -> dict:
        return {**asdict(self), "order": list(self.order)}

    @classmethod
    def from_json(cls, data: dict) -> "SequentialPlan":
        return cls(**{**data, "order": tuple(int(p) for p in data["order"])})


# -- items -----------------------------------------------------------------------------------
def item_outcome(votes: list[bool], k: int) -> bool | None:
    """The majority of k, as soon as it is settled: pass once more than half of k passed,
    fail once half or more failed (a tie fails, as :func:`aggregate.majority` has it);
    None while the remaining verdicts could still go either way.  Only the first k
    verdicts count."""
    votes = votes[:k]
    passes = sum(votes)
    if 2 * passes > k:
        return True
    if 2 * (len(votes) - passes) >= k:
        return False
    return None


def votes_to_settle(passes: int, fails: int, k: int) -> int:
    """The fewest further verdicts that can settle an item (0 when settled): the item is
    served to at most this many reviewers at once."""
    to_pass = k // 2 + 1 - passes
    to_fail = (k + 1) // 2 - fails
    return max(0, min(to_pass, to_fail))


# -- the e-values ----------------------------------------------------------------------------
def log_e_better(better: int, worse: int, high: float = HIGH) -> float:
    """log E(B, W), the mixture (uniform q on [1/2, high]) likelihood ratio against
    q = 1/2: 2^n * integral over [1/2, high] of q^B (1-q)^W dq / (high - 1/2)."""
    from scipy.special import betainc, betaln

    n = better + worse
    mass = betainc(better + 1, worse + 1, high) - betainc(better + 1, worse + 1, 0.5)
    if mass <= 0.0:
        return -math.inf
    return n * math.log(2.0) + betaln(better + 1, worse + 1) + math.log(mass) \
        - math.log(high - 0.5)


def log_e_futile(better: int, worse: int, q1: float, low: float = 0.25) -> float:
    """log of the mixture (uniform q on [low, q1]) likelihood ratio against q1: large when
    the candidate wins fewer discordant prompts than a q1-better model would.  Every q in
    the mixture is at most q1, so it is a supermartingale under every q >= q1."""
    from scipy.special import betainc, betaln

    mass = betainc(better + 1, worse + 1, q1) - betainc(better + 1, worse + 1, low)
    if mass <= 0.0:
        return -math.inf
    return (betaln(better + 1, worse + 1) + math.log(mass) - math.log(q1 - low)
            - better * math.log(q1) - worse * math.log(1.0 - q1))


@lru_cache(maxsize=64)
def critical_counts(n_max: int, alpha: float, alpha_e: float) -> tuple[float, ...]:
    """c(n) for n = 0..n_max: the smallest count of candidate-only prompts among n
    discordant ones that the final look promotes on, such that under fair coins the early
    looks (E >= 1/alpha_e at any point) and the final look together promote with chance
    below alpha (as the fixed panel's p < alpha).  ``inf`` where no count qualifies.  Exact: dynamic programming over the
    paths that have not crossed."""
    import numpy as np

    crossed = 0.0
    alive = np.zeros(n_max + 2)
    alive[0] = 1.0
    out: list[float] = [math.inf]
    for n in range(1, n_max + 1):
        step = np.zeros_like(alive)
        step[1:] += 0.5 * alive[:-1]   # the candidate's side
        step[:] += 0.5 * alive         # the champion's side
        first = first_crossing(n, alpha_e)  # E grows with b: every b from here crosses
        crossed += float(step[first:n + 1].sum())
        step[first:] = 0.0
        alive = step
        # the final look's region: b >= c, the largest tail with crossed + tail < alpha
        # (strictly, as the fixed panel's p < alpha; the margin absorbs rounding)
        c, tail = n + 1, 0.0
        while c - 1 >= 0 and crossed + tail + alive[c - 1] < alpha * (1 - 1e-9):
            c -= 1
            tail += alive[c]
        out.append(float(c) if c <= n else math.inf)
    return tuple(out)


@lru_cache(maxsize=8192)
def first_crossing(n: int, alpha_e: float) -> int:
    """The smallest b with E(b, n - b) >= 1/alpha_e (n + 1 when none)."""
    import numpy as np
    from scipy.special import betainc, betaln

    b = np.arange(n // 2, n + 1, dtype=float)  # E < 1 while b <= n/2
    mass = betainc(b + 1, n - b + 1, HIGH) - betainc(b + 1, n - b + 1, 0.5)
    with np.errstate(divide="ignore"):
        log_e = n * math.log(2.0) + betaln(b + 1, n - b + 1) + np.log(mass) \
            - math.log(HIGH - 0.5)
    hits = np.nonzero(log_e >= math.log(1.0 / alpha_e))[0]
    return int(b[hits[0]]) if len(hits) else n + 1


@lru_cache(maxsize=64)
def fixed_counts(n_max: int, alpha: float) -> tuple[float, ...]:
    """The fixed panel's critical counts for n = 0..n_max: the smallest b with the gate's
    exact one-sided McNemar p (``aggregate.mcnemar_exact``) below alpha (``inf``: none).
    The p falls as b grows, so each count is found by bisection."""
    from rlhf_tasks.panel.aggregate import mcnemar_exact

    out = [math.inf]
    for n in range(1, n_max + 1):
        low, high = 0, n + 1  # p(high) counts as below alpha: b = n + 1 means none
        while low < high:
            mid = (low + high) // 2
            if mcnemar_exact(mid, n - mid) < alpha:
                high = mid
            else:
                low = mid + 1
        out.append(float(low) if low <= n else math.inf)
    return tuple(out)


def fixed_critical(n: int, alpha: float) -> float:
    """The fixed panel's critical count for n discordant prompts."""
    return fixed_counts(n, alpha)[n]


SHARES = (0.5, 0.25, 0.1, 0.06, 0.04, 0.02, 0.01, 0.005, 0.002)


@lru_cache(maxsize=64)
def slack_alpha(n_prompts: int, alpha: float) -> float:
    """The largest alpha_e (a share of alpha from SHARES) whose early looks leave every
    final count c(n) equal to the fixed panel's: the early looks then spend only what the
    exact test's discreteness leaves unspent, and the final look promotes whenever the
    fixed panel would."""
    fixed = fixed_counts(n_prompts, alpha)
    for share in SHARES:
        counts = critical_counts(n_prompts, alpha, alpha * share)
        if all(c <= f for c, f in zip(counts, fixed)):
            return alpha * share
    return alpha * SHARES[-1]


# -- the state of a batch --------------------------------------------------------------------
@dataclass
class SequentialState:
    decided: bool                 # the panel may stop: promote-worthy or out of reach
    promote_worthy: bool          # the significance rule holds (the gate checks the rest)
    look: str                     # early, futility, final, deadline or open
    prompts: int                  # prompts in the plan
    prompts_decided: int          # the decided prefix (in serving order)
    better: int                   # prefix prompts only the candidate passed
    worse: int                    # ... only the reference passed
    e_value: float
    e_threshold: float
    futility_e: float
    critical: float | None        # the final look's count, when the final look is reached
    verdicts_used: int
    verdicts_fixed: int           # k x every item of the batch: a fixed panel's verdicts
    policy_ok: bool = False       # the policy's point rules hold on the decided prefix
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("e_value", "futility_e", "critical"):
            if out[key] is not None and math.isinf(out[key]):
                out[key] = None if key == "critical" else 1e300
        return out


def outcomes_by_prompt(rows: list[dict], plan: SequentialPlan) -> dict[str, dict[int, bool]]:
    """Each decision model's settled items, ``{model: {prompt_index: passed}}``, from verdict
    rows (``model``, ``prompt_index``, ``passed``, ``id``) in arrival order."""
    from rlhf_tasks.panel.aggregate import verdicts_by_item

    out: dict[str, dict[int, bool]] = {m: {} for m in plan.models}
    for item_rows in verdicts_by_item(rows).values():
        model = item_rows[0]["model"]
        if model not in out:
            continue
        outcome = item_outcome([bool(r["passed"]) for r in item_rows], plan.k)
        if outcome is not None:
            out[model][int(item_rows[0]["prompt_index"])] = outcome
    return out


def evaluate(plan: SequentialPlan, rows: list[dict], *, items_in_batch: int,
             final: bool = False) -> SequentialState:
    """The sequential panel's state after the verdicts ``rows``.  ``final``: the batch
    closed without an early stop (its deadline); then only E >= 1/alpha promotes."""
    settled = outcomes_by_prompt(rows, plan)
    cand, ref = settled[plan.candidate], settled[plan.reference]
    needed = [m for m in plan.models if m != plan.expert]
    # the decided prefix in serving order: prompts whose decision items are all settled
    # (a prompt with no item of a model is no part of the comparison)
    prefix: list[int] = []
    for p in plan.order:
        if all(p in settled[m] for m in needed):
            prefix.append(p)
        else:
            break
    better = sum(1 for p in prefix if cand[p] and not ref[p])
    worse = sum(1 for p in prefix if ref[p] and not cand[p])
    n_prompts = len(plan.order)
    log_e = log_e_better(better, worse)
    log_f = log_e_futile(better, worse, plan.futility_q)
    verdicts_used = sum(1 for r in rows if r["model"] in plan.models)
    state = SequentialState(
        decided=False, promote_worthy=False, look="open", prompts=n_prompts,
        prompts_decided=len(prefix), better=better, worse=worse,
        e_value=math.exp(min(log_e, 700.0)), e_threshold=1.0 / plan.alpha_e,
        futility_e=math.exp(min(log_f, 700.0)), critical=None,
        verdicts_used=verdicts_used, verdicts_fixed=items_in_batch * plan.k)
    policy_ok, policy_reason = _policy(plan, prefix, cand, ref, settled)
    state.policy_ok = policy_ok
    remaining = n_prompts - len(prefix)
    if len(prefix) == n_prompts:  # every decision item settled: the final look
        c = critical_counts(n_prompts, plan.significance, plan.alpha_e)[better + worse]
        state.critical = c
        significant = log_e >= math.log(1.0 / plan.alpha_e) or better >= c
        state.decided, state.look = True, "final"
        state.promote_worthy = significant
        state.reason = (f"final look: {better} of {better + worse} discordant prompts for "
                        f"{plan.candidate}, {'at least' if significant else 'below'} the "
                        f"critical count {_count(c)}")
        return state
    if final:  # closed by the deadline before the final look
        significant = log_e >= math.log(1.0 / plan.significance)
        state.decided, state.look, state.promote_worthy = True, "deadline", significant
        state.reason = (f"deadline after {len(prefix)} of {n_prompts} prompts: E = "
                        f"{state.e_value:.3g} {'>=' if significant else '<'} "
                        f"1/alpha = {1 / plan.significance:.3g}")
        return state
    if len(prefix) >= plan.min_prompts and log_e >= math.log(1.0 / plan.alpha_e) \
            and policy_ok:
        state.decided, state.promote_worthy, state.look = True, True, "early"
        state.reason = (f"E = {state.e_value:.3g} >= {state.e_threshold:.3g} after "
                        f"{len(prefix)} of {n_prompts} prompts ({better} for "
                        f"{plan.candidate}, {worse} for {plan.reference})")
        return state
    out_of_reach = _out_of_reach(plan, prefix, better, worse, remaining, cand, ref)
    if out_of_reach:
        state.decided, state.look, state.reason = True, "futility", out_of_reach
        return state
    if len(prefix) >= plan.min_prompts and log_f >= math.log(1.0 / plan.futility_beta):
        state.decided, state.look = True, "futility"
        state.reason = (f"{plan.candidate} won {better} of {better + worse} discordant "
                        f"prompts after {len(prefix)} of {n_prompts}: the evidence against "
                        f"a rate of {plan.futility_q:.2f} reached {state.futility_e:.3g} >= "
                        f"1/beta = {1 / plan.futility_beta:.3g}")
        return state
    state.reason = policy_reason or "open"
    return state


def _count(c: float) -> str:
    return "none reachable" if math.isinf(c) else str(int(c))


def _policy(plan: SequentialPlan, prefix: list[int], cand: dict, ref: dict,
            settled: dict) -> tuple[bool, str]:
    """The policy's point rules on the decided prefix (an early promotion needs them)."""
    if not prefix:
        return False, "no prompt decided yet"
    rate = sum(cand[p] for p in prefix) / len(prefix)
    lift = rate - sum(ref[p] for p in prefix) / len(prefix)
    if rate < plan.min_pass_rate:
        return False, f"pass rate {rate:.3f} below {plan.min_pass_rate:.3f} so far"
    if lift < plan.min_lift:
        return False, f"lift {lift:+.3f} below {plan.min_lift:+.3f} so far"
    if plan.expert and plan.max_gap is not None:
        shared = [p for p in prefix if p in settled[plan.expert]]
        if not shared:
            return False, "no expert-written answer decided yet"
        gap = sum(settled[plan.expert][p] for p in shared) / len(shared) - \
            sum(cand[p] for p in shared) / len(shared)
        if gap > plan.max_gap:
            return False, f"{gap:.3f} behind the expert-written answers so far"
    return True, ""


def _out_of_reach(plan: SequentialPlan, prefix: list[int], better: int, worse: int,
                  remaining: int, cand: dict, ref: dict) -> str:
    """Why no outcome of the remaining prompts can meet the policy ('' when one can): the
    best case for the candidate is that it passes every remaining prompt and the
    reference fails them all."""
    n = len(plan.order)
    best_rate = (sum(cand[p] for p in prefix) + remaining) / n
    if best_rate < plan.min_pass_rate:
        return (f"even passing all {remaining} remaining prompts, {plan.candidate}'s pass "
                f"rate would be {best_rate:.3f} < {plan.min_pass_rate:.3f}")
    best_lift = (better - worse + remaining) / n
    if best_lift < plan.min_lift:
        return (f"even winning all {remaining} remaining prompts, the lift would be "
                f"{best_lift:+.3f} < {plan.min_lift:+.3f}")
    counts = critical_counts(n, plan.significance, plan.alpha_e)
    if log_e_better(better + remaining, worse) < math.log(1.0 / plan.alpha_e) and \
            not any(better + j >= counts[better + worse + j] for j in range(remaining + 1)):
        return (f"even winning all {remaining} remaining prompts, {plan.candidate} could "
                f"not reach the final look's critical count")
    return ""
