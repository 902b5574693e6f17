"""The panel report: pass-rate bars with 95% intervals (PNG) and the case-study table
(HTML): model, the data it was tuned on, expert pass rate and interval."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from rlhf_tasks.config import TUNING_ALGORITHMS
from rlhf_tasks.panel.aggregate import PanelResult
from rlhf_tasks.panel.gate import CANDIDATE, EXPERT

# a bake-off's candidates are labelled by their algorithm (tuning.algorithms)
TABLE_ORDER = ("foundation", "sft", "champion", CANDIDATE, *TUNING_ALGORITHMS, EXPERT)
TITLES = {"foundation": "Foundation model", "sft": "Supervised tuning (SFT)",
          "champion": "Current champion", CANDIDATE: "RLHF (candidate)",
          "ppo": "PPO (candidate)", "rloo": "RLOO (candidate)", "grpo": "GRPO (candidate)",
          "dr_grpo": "Dr. GRPO (candidate)", "dpo": "DPO (candidate)",
          EXPERT: "Expert-written answers"}


def ordered(models) -> list[str]:
    known = [m for m in TABLE_ORDER if m in models]
    return known + sorted(m for m in models if m not in TABLE_ORDER)


def table_rows(result: PanelResult, data_sizes: dict[str, str]) -> list[dict]:
    return [{"model": m, "title": TITLES.get(m, m), "data": data_sizes.get(m, ""),
             "items": s.items, "passed": s.passed, "pass_rate": s.pass_rate,
             "ci_low": s.ci_low, "ci_high": s.ci_high}
            for m in ordered(result.scores) for s in [result.scores[m]]]


def text_table(rows: list[dict]) -> str:
    """The case-study table as plain text (printed by ``make demo``)."""
    lines = [f"{'model':26} {'data':44} {'pass rate':>9}  95% interval   items"]
    for r in rows:
        lines.append(f"{r['title']:26} {r['data'][:44]:44} {r['pass_rate']:9.1%}  "
                     f"[{r['ci_low']:5.1%}, {r['ci_high']:5.1%}]  {r['items']:5d}")
    return "\n".join(lines)


def bake_off_table(decisions: dict, chosen: str) -> str:
    """A bake-off's candidates against the reference, one row each: pass rate, lift, the
    McNemar p and its Holm adjustment, and what the gate made of it."""
    def number(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [f"{'candidate':12} {'pass rate':>9} {'lift':>7} {'p':>8} {'p (Holm)':>9}  decision"]
    for label, d in decisions.items():
        verdict = ("promote" if d.promote else "reject") + (" (chosen)" if label == chosen
                                                            else "")
        lines.append(f"{label:12} {number(d.candidate_pass_rate, '9.1%'):>9} "
                     f"{number(d.lift, '+7.3f'):>7} {number(d.p_value, '8.3g'):>8} "
                     f"{number(d.p_adjusted, '9.3g'):>9}  {verdict}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, *, simulated: bool,
         candidates: list[str] = (CANDIDATE,)) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = range(len(rows))
    rates = [r["pass_rate"] * 100 for r in rows]
    errors = [[(r["pass_rate"] - r["ci_low"]) * 100 for r in rows],
              [(r["ci_high"] - r["pass_rate"]) * 100 for r in rows]]
    colors = ["#dd8452" if r["model"] in candidates else "#4c72b0" for r in rows]
    ax.bar(x, rates, yerr=errors, capsize=6, color=colors)
    for i, rate in zip(x, rates):
        ax.text(i, 2, f"{rate:.1f}%", ha="center", color="white", fontweight="bold")
    ax.set_xticks(list(x), [r["title"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("expert pass rate (%)")
    ax.set_title("Expert pass rate, 95% Wilson intervals"
                 + (" -- SIMULATED panel" if simulated else ""))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_time_html(time: dict | None) -> str:
    """The experts' time: per model and per reviewer (measured or declared)."""
    esc = html.escape
    if not time:
        return ""
    if not time["timed"]:
        return ("<h2>Expert time</h2><p>No expert time: the verdicts were simulated or "
                "imported without a declared time.</p>")

    def rows(part: dict, title) -> str:
        out = ""
        for name, t in part.items():
            mean = "" if t["mean_seconds"] is None else f"{t['mean_seconds']:.1f}"
            out += (f"<tr><td>{esc(title(name))}</td><td>{t['verdicts']}</td>"
                    f"<td>{t['measured']}</td><td>{t['declared']}</td>"
                    f"<td>{t['seconds'] / 60:.1f}</td><td>{mean}</td></tr>")
        return out

    head = ("<tr><th></th><th>verdicts</th><th>measured</th><th>declared</th>"
            "<th>minutes</th><th>seconds per verdict</th></tr>")
    return (f"<h2>Expert time</h2><p>{time['seconds'] / 60:.1f} minutes over {time['timed']} "
            f"timed verdicts ({time['measured']} measured from serving to verdict, at most "
            f"the idle cap each; {time['declared']} declared in offline imports).</p>"
            f"<table>{head}{rows(time['per_model'], lambda m: TITLES.get(m, m))}</table>"
            f"<table>{head}{rows(time['per_reviewer'], str)}</table>")


def sequential_line(state: dict) -> str:
    """What a sequential panel's decision took, against a fixed panel."""
    share = state["verdicts_used"] / state["verdicts_fixed"] if state["verdicts_fixed"] else 0
    return (f"Sequential panel: decided at the {state['look']} look after "
            f"{state['prompts_decided']} of {state['prompts']} prompts ({state['reason']}); "
            f"the decision took {state['verdicts_used']} verdicts, a fixed panel would have "
            f"taken {state['verdicts_fixed']} ({share:.0%}).")


def write_html(path: Path, *, rows: list[dict], result: PanelResult, decision: dict,
               png: Path, simulated: bool, batch_id: str, run: str,
               agreement: dict | None = None, warnings: list[str] | None = None,
               expert_time: dict | None = None, cost_table: str | None = None) -> Path:
    esc = html.escape
    image = base64.b64encode(png.read_bytes()).decode()
    body = "".join(
        f"<tr><td>{esc(r['title'])}</td><td>{esc(r['data'])}</td>"
        f"<td>{r['pass_rate']:.1%}</td><td>[{r['ci_low']:.1%}, {r['ci_high']:.1%}]</td>"
        f"<td>{r['passed']}/{r['items']}</td></tr>" for r in rows)
    kappa = "undefined" if result.kappa is None else f"{result.kappa:.3f}"
    banner = ("<p class='sim'>SIMULATED panel: rubric raters with per-rater noise stood in "
              "for people.</p>" if simulated else "")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in decision.get("reasons", []))
    agreement_rows = "".join(
        f"<tr><td>{esc(TITLES.get(m, m))}</td><td>"
        f"{'undefined' if auc is None else f'{auc:.3f}'}</td><td>{n_pass}</td><td>{n_fail}</td>"
        f"</tr>" for m in ordered(agreement or {}) for auc, n_pass, n_fail in [agreement[m]])
    agreement_html = (
        "<h2>Does the reward model agree with the panel?</h2><p>Per model, the chance that "
        "an answer the panel passed scores higher than one it failed (AUC; 0.5: the reward "
        "tells nothing about the panel's verdict).</p><table><tr><th>model</th><th>AUC</th>"
        f"<th>passed</th><th>failed</th></tr>{agreement_rows}</table>" if agreement_rows else "")
    warning_html = ("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings)
                    + "</ul>" if warnings else "")
    sequential = decision.get("sequential")
    sequential_html = f"<p>{esc(sequential_line(sequential))}</p>" if sequential else ""
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>Expert panel report: {esc(run)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
.sim{{background:#fff3cd;padding:6px;border:1px solid #e0c060}}</style></head><body>
<h1>Expert panel report</h1>{banner}
<p>Pipeline run <code>{esc(run)}</code>, review batch <code>{esc(batch_id)}</code>:
{result.verdicts} verdicts from {result.reviewers} reviewers on {result.items_decided} decided
items. Agreement (Fleiss' kappa): {kappa}.</p>
<table><tr><th>model</th><th>data</th><th>pass rate</th><th>95% interval</th>
<th>passed</th></tr>{body}</table>
<h2>Gate: {'promote' if decision.get('promote') else 'reject'}</h2><ul>{reasons}</ul>
{sequential_html}{warning_html}{agreement_html}{expert_time_html(expert_time)}
{f"<h2>Benefit and cost</h2><pre>{esc(cost_table)}</pre>" if cost_table else ""}
<img alt="pass rates" src="data:image/png;base64,{image}"></body></html>""",
                    encoding="utf-8")
    return path
