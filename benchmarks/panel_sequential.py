"""The sequential panel against the fixed panel, by simulation.

Simulated panels judge a candidate and a champion on the same prompts over a grid of true
lifts (candidate minus champion, in pass-rate points), with rater noise like the demo's
(``panel.simulated``: each rater flips a verdict with chance noise x U(0.5, 1.5) and fails
a passing answer with chance strictness x U(0.5, 1.5)).  Each replicate draws the answers'
true quality (paired: the two answers to a prompt are correlated), the panel's raters and
every item's first k verdicts; both panels see the same verdicts:

* **fixed**: every item judged k times, then the gate's policy with the exact McNemar test;
* **sequential**: ``rlhf_tasks.panel.sequential`` looking after every prompt in serving
  order, curtailed items (k = 3: a third verdict only when the first two disagree), early
  promotion, stops when the policy is out of reach, the final look.

Per lift it prints the promotion rate and the mean verdicts of each; then the type-I error
(the highest promotion rate at a true lift <= 0), the power at +10 points and the mean
verdicts as a share of the fixed panel's over the grid.  The last two lines:

    sequential: type-I X, power Y, verdicts Z% of fixed
    fixed: type-I X, power Y, verdicts 100% of fixed

    .venv/bin/python benchmarks/panel_sequential.py            # 2,000 replicates per lift
    .venv/bin/python benchmarks/panel_sequential.py --reps 200 --prompts 60

The procedure is vectorised over replicates here; ``tests/test_panel_sequential.py``
checks that it decides as ``sequential.evaluate`` does, replicate by replicate.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_tasks.config import PanelSection  # noqa: E402
from rlhf_tasks.panel import sequential as sq  # noqa: E402

LIFTS = (-10.0, -5.0, 0.0, 5.0, 10.0, 15.0)


def parse_args(argv=None):
    defaults = PanelSection()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2000, help="replicates per lift")
    p.add_argument("--prompts", type=int, default=150, help="eval prompts in the batch")
    p.add_argument("--champion-pass", type=float, default=0.6,
                   help="the champion's true pass rate")
    p.add_argument("--pair-correlation", type=float, default=0.5,
                   help="chance that the two answers to a prompt share their difficulty")
    p.add_argument("--k", type=int, default=defaults.verdicts_per_item)
    p.add_argument("--raters", type=int, default=None, help="default: max(5, k)")
    p.add_argument("--noise", type=float, default=defaults.simulated.noise)
    p.add_argument("--strictness", type=float, default=defaults.simulated.strictness)
    p.add_argument("--significance", type=float, default=defaults.significance)
    p.add_argument("--min-pass-rate", type=float, default=defaults.pass_rate_threshold)
    p.add_argument("--min-lift", type=float, default=defaults.min_lift)
    p.add_argument("--early-alpha", type=float, default=None,
                   help="alpha_e of the early looks (default: the exact test's slack)")
    p.add_argument("--futility-q", type=float, default=sq.SequentialPlan.futility_q)
    p.add_argument("--futility-beta", type=float, default=sq.SequentialPlan.futility_beta)
    p.add_argument("--min-prompts", type=int, default=sq.SequentialPlan.min_prompts)
    p.add_argument("--lifts", type=float, nargs="+", default=list(LIFTS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def plan_for(args) -> sq.SequentialPlan:
    return sq.SequentialPlan(
        candidate="candidate", reference="champion", order=tuple(range(args.prompts)),
        k=args.k, significance=args.significance, min_pass_rate=args.min_pass_rate,
        min_lift=args.min_lift, early_alpha=args.early_alpha, futility_q=args.futility_q,
        futility_beta=args.futility_beta, min_prompts=args.min_prompts)


def simulate_verdicts(args, lift: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every item's first k verdicts, (reps, prompts, k) booleans per model."""
    reps, n, k = args.reps, args.prompts, args.k
    raters = args.raters or max(5, k)
    u = rng.random((reps, n))
    v = np.where(rng.random((reps, n)) < args.pair_correlation, u, rng.random((reps, n)))
    truth = {"champion": u < args.champion_pass,
             "candidate": v < args.champion_pass + lift / 100.0}
    noise = args.noise * rng.uniform(0.5, 1.5, (reps, raters))
    strict = args.strictness * rng.uniform(0.5, 1.5, (reps, raters))
    out = {}
    for model, true in truth.items():
        # k distinct raters per item, in the order they judge it
        who = np.argsort(rng.random((reps, n, raters)), axis=2)[:, :, :k]
        row = np.arange(reps)[:, None, None]
        verdict = np.repeat(true[:, :, None], k, axis=2)
        verdict &= ~(rng.random((reps, n, k)) < strict[row, who])
        verdict ^= rng.random((reps, n, k)) < noise[row, who]
        out[model] = verdict
    return out


def item_outcomes(verdicts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's majority and the verdicts it took when curtailed (as
    ``sequential.item_outcome`` settles it)."""
    passes = np.cumsum(verdicts, axis=2)
    seen = np.arange(1, k + 1)
    settled = (2 * passes > k) | (2 * (seen - passes) >= k)
    used = np.argmax(settled, axis=2) + 1
    majority = 2 * passes[:, :, -1] > k
    return majority, used


def fixed_panel(args, cand: np.ndarray, champ: np.ndarray) -> np.ndarray:
    """The gate's policy on every prompt with the exact McNemar test."""
    n = args.prompts
    better = (cand & ~champ).sum(1)
    worse = (champ & ~cand).sum(1)
    crit = np.array([sq.fixed_critical(m, args.significance) for m in range(n + 1)])
    rate = cand.mean(1)
    lift = rate - champ.mean(1)
    return (better >= crit[better + worse]) & (rate >= args.min_pass_rate) \
        & (lift >= args.min_lift)


class Tables:
    """log E, log E_futility, the final look's counts and the reach table, for
    0..prompts discordant prompts: the vectorised procedure looks them up."""

    def __init__(self, plan: sq.SequentialPlan):
        n = len(plan.order)
        self.log_e = np.full((n + 1, n + 1), -np.inf)
        self.log_f = np.full((n + 1, n + 1), -np.inf)
        for b in range(n + 1):
            for w in range(n + 1 - b):
                self.log_e[b, w] = sq.log_e_better(b, w)
                self.log_f[b, w] = sq.log_e_futile(b, w, plan.futility_q)
        self.crit = np.array(sq.critical_counts(n, plan.significance, plan.alpha_e))
        # reach[d, r]: max over j <= r of (j - crit[d + j]); the final count is reachable
        # from b candidate-only prompts among d discordant ones iff b + reach[d, r] >= 0
        self.reach = np.full((n + 1, n + 1), -np.inf)
        for d in range(n + 1):
            best = -np.inf
            for j in range(n + 1 - d):
                best = max(best, j - self.crit[d + j])
                self.reach[d, j] = best


def sequential_panel(plan: sq.SequentialPlan, cand: np.ndarray, champ: np.ndarray,
                     used: np.ndarray, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    """(promoted, verdicts used) per replicate; looks after each prompt in order."""
    reps, n = cand.shape
    bound, fbound = math.log(1 / plan.alpha_e), math.log(1 / plan.futility_beta)
    done = np.zeros(reps, bool)
    promoted = np.zeros(reps, bool)
    verdicts = np.zeros(reps, int)
    b = np.zeros(reps, int)
    w = np.zeros(reps, int)
    passes = np.zeros(reps, int)
    ref_passes = np.zeros(reps, int)
    for m in range(1, n + 1):
        live = ~done
        verdicts[live] += used[live, m - 1]
        b += live & cand[:, m - 1] & ~champ[:, m - 1]
        w += live & champ[:, m - 1] & ~cand[:, m - 1]
        passes += live & cand[:, m - 1]
        ref_passes += live & champ[:, m - 1]
        log_e = tables.log_e[b, w]
        if m == n:
            final = live & ((log_e >= bound) | (b >= tables.crit[b + w]))
            promoted |= final & _point_rules(plan, passes, ref_passes, m)
            break
        rate_ok = _point_rules(plan, passes, ref_passes, m)
        early = live & (m >= plan.min_prompts) & (log_e >= bound) & rate_ok
        promoted |= early
        done |= early
        r = n - m
        reach = (tables.log_e[b + r, w] >= bound) | (b + tables.reach[b + w, r] >= 0)
        out = ((passes + r) / n < plan.min_pass_rate) | \
            ((b - w + r) / n < plan.min_lift) | ~reach
        futile = live & ~early & (out | ((m >= plan.min_prompts)
                                         & (tables.log_f[b, w] >= fbound)))
        done |= futile
    return promoted, verdicts


def _point_rules(plan, passes, ref_passes, m):
    rate = passes / m
    return (rate >= plan.min_pass_rate) & (rate - ref_passes / m >= plan.min_lift)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = plan_for(args)
    tables = Tables(plan)
    rng = np.random.default_rng(args.seed)
    fixed_verdicts = 2 * args.prompts * args.k
    print(f"{args.prompts} prompts x 2 models, k = {args.k}, {args.reps} replicates per lift, "
          f"champion pass rate {args.champion_pass:.2f}, rater noise {args.noise} / "
          f"strictness {args.strictness}; policy: significance {args.significance}, minimum "
          f"pass rate {args.min_pass_rate}, minimum lift {args.min_lift}; sequential: "
          f"alpha_e {plan.alpha_e:g}, futility q1 {plan.futility_q} at beta "
          f"{plan.futility_beta}, from {plan.min_prompts} prompts; seed {args.seed}")
    print(f"{'true lift':>9} | {'fixed: promoted':>15} {'verdicts':>8} | "
          f"{'sequential: promoted':>20} {'verdicts':>8} {'share':>6}")
    rows = {}
    for lift in args.lifts:
        verdicts = simulate_verdicts(args, lift, rng)
        cand, cand_used = item_outcomes(verdicts["candidate"], args.k)
        champ, champ_used = item_outcomes(verdicts["champion"], args.k)
        fixed = fixed_panel(args, cand, champ)
        seq, used = sequential_panel(plan, cand, champ, cand_used + champ_used, tables)
        rows[lift] = (fixed.mean(), seq.mean(), used.mean() / fixed_verdicts)
        print(f"{lift:>+8.1f}p | {fixed.mean():>15.3f} {fixed_verdicts:>8d} | "
              f"{seq.mean():>20.3f} {used.mean():>8.1f} {used.mean() / fixed_verdicts:>6.1%}",
              flush=True)
    null = [v for lift, v in rows.items() if lift <= 0]
    power_at = 10.0 if 10.0 in rows else max(rows)
    share = float(np.mean([v[2] for v in rows.values()]))
    print(f"power at {power_at:+.0f} points; type-I: the highest promotion rate at a true "
          f"lift <= 0; verdicts: the mean share over the {len(rows)} lifts")
    print(f"fixed: type-I {max(v[0] for v in null):.3f}, power {rows[power_at][0]:.3f}, "
          f"verdicts 100% of fixed")
    print(f"sequential: type-I {max(v[1] for v in null):.3f}, power {rows[power_at][1]:.3f}, "
          f"verdicts {share:.0%} of fixed")


if __name__ == "__main__":
    main()
