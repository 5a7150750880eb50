"""The retrofit experiment's numbers: summary over seeds, verdict sentences and the report section.

Input: the experiment as :func:`simvq.compare.retrofit.run_retrofit_experiment` returns it, its records
measured (``per_seed[seed][row]`` is a run record). Output (``results.json``'s ``retrofit``): one row per
model (the collapsed plain-VQ start, the control, each strategy, a SimVQ trained from scratch) with every
metric as ``mean ± sample std`` over the seeds, the per-seed values, and the dead-code reports.
"""

from __future__ import annotations

from simvq.compare.records import merged_eval
from simvq.compare.summary import beyond_spread, fmt, fmt_stat, stats

#: the rows, in report order: (name, label)
RETROFIT_ROWS = (
    ("before", "plain VQ at the swap (the comparison's run, collapsed)"),
    ("control", "control: the same plain VQ trained on"),
    ("keep", "retrofit `keep` (exact swap), trained on"),
    ("respread", "retrofit `respread` (dead codes redrawn from training features), trained on"),
    ("fresh", "retrofit `fresh` (new random C, W fitted to the live codes), trained on"),
    ("simvq", "SimVQ from scratch (the comparison's run)"),
)
STRATEGY_ROWS = ("keep", "respread", "fresh")
#: the target of the experiment: a strategy that lifts held-out utilisation above this, at no loss of quality
TARGET_UTILIZATION = 0.5


def summarise_retrofit(retro: dict | None, keys: tuple[str, ...]) -> dict | None:
    """``results.json``'s ``retrofit`` section: every row's ``keys`` as stats over the seeds."""
    if not retro:
        return None
    seeds = sorted(retro["per_seed"])
    rows = []
    for name, label in RETROFIT_ROWS:
        runs = []
        for seed in seeds:
            rec = retro["per_seed"][seed].get(name)
            if rec is None:
                continue
            ev = merged_eval(rec)
            runs.append({"seed": seed, "key": rec.get("key"), "steps": rec.get("steps"), "status": rec.get("status"),
                         "wall_time_s": rec.get("wall_time_s"), **{k: ev.get(k) for k in keys}})
        if not runs:
            continue
        metrics = {k: stats([r[k] for r in runs if isinstance(r.get(k), (int, float)) and r.get("status") == "ok"])
                   for k in (*keys, "steps")}
        rows.append({"name": name, "label": label, "metrics": metrics, "runs": runs})
    dead = {}
    for seed in seeds:
        for strategy, report in retro["per_seed"][seed].get("dead_codes", {}).items():
            dead.setdefault(strategy, []).append({"seed": seed, **report})
    return {
        "codebook_size": retro["size"],
        "seeds": seeds,
        "dead_code_items": retro.get("dead_code_items"),
        "replaced": retro.get("replaced"),
        "rows": rows,
        "dead_codes": dead,
    }


def _row(summary: dict, name: str) -> dict | None:
    return next((r for r in summary["rows"] if r["name"] == name), None)


def _note(a: dict, b: dict) -> str:
    if (a.get("n") or 0) < 2 and (b.get("n") or 0) < 2:
        return ", one seed"
    return "" if beyond_spread(a, b) else ", within the seed spread"


def retrofit_verdict(p: dict, summary: dict | None) -> list[str]:
    """Sentences from the numbers: per strategy against the control and the target, then against SimVQ.

    ``p`` is the modality's ``VERDICT`` (its ``retrofit`` quality metric and, in ``quality``, whether
    higher is better).
    """
    if not summary or "rows" not in summary:
        return []
    key, kind, _prefix, unit = p["retrofit"]
    label, higher = next(((q[1], q[3]) for q in p["quality"] if q[0] == key), (key, True))
    control, size = _row(summary, "control"), summary["codebook_size"]
    if not control or not control["metrics"]["utilization"]["n"] or not control["metrics"][key]["n"]:
        return []
    cu, cq = control["metrics"]["utilization"], control["metrics"][key]
    steps = fmt(control["metrics"]["steps"]["mean"], "0f")
    at_least = "at least" if higher else "at most"
    target = f"utilisation above {100 * TARGET_UTILIZATION:.0f}% with {label} {at_least} the control's"
    lines, met, tried = [], [], []
    for name in STRATEGY_ROWS:
        row = _row(summary, name)
        if not row or not row["metrics"]["utilization"]["n"] or not row["metrics"][key]["n"]:
            continue
        tried.append(name)
        u, q = row["metrics"]["utilization"], row["metrics"][key]
        dq = q["mean"] - cq["mean"]
        ok = u["mean"] > TARGET_UTILIZATION and (dq >= 0 if higher else dq <= 0)
        if ok:
            met.append(name)
        lines.append(
            f"Retrofit K={size}, `{name}`, {steps} more steps: {fmt_stat(u, 'pct')}% of codes used on held-out "
            f"{p['held_out']} against {fmt_stat(cu, 'pct')}% for plain VQ trained as long "
            f"({100 * (u['mean'] - cu['mean']):+.1f} points{_note(u, cu)}); {label} {fmt_stat(q, kind)}{unit} against "
            f"{fmt_stat(cq, kind)}{unit} ({dq:+.{kind[0]}f}{unit}{_note(q, cq)}): "
            + ("meets" if ok else "misses") + " the target.")
    if not tried:
        return []
    lines.append(f"Retrofit target ({target}): met by "
                 + (", ".join(f"`{n}`" for n in met) if met else "no strategy") + f" of {len(tried)}.")
    simvq = _row(summary, "simvq")
    if simvq and simvq["metrics"]["utilization"]["n"] and simvq["metrics"][key]["n"]:
        sq = simvq["metrics"][key]
        best = max(tried, key=lambda n: _row(summary, n)["metrics"][key]["mean"] * (1 if higher else -1))
        bq = _row(summary, best)["metrics"][key]
        lines.append(
            f"Against SimVQ trained from scratch for as many steps as the continuation "
            f"({fmt(simvq['metrics']['steps']['mean'], '0f')}): it uses {fmt_stat(simvq['metrics']['utilization'], 'pct')}% "
            f"at {fmt_stat(sq, kind)}{unit}; the best retrofit by {label}, `{best}`, is at {fmt_stat(bq, kind)}{unit} "
            f"({bq['mean'] - sq['mean']:+.{kind[0]}f}{unit}{_note(bq, sq)}), having trained twice as many steps in all.")
    return lines


def retrofit_section(summary: dict, columns: list[tuple[str, str, str]]) -> dict:
    """The report's paragraph and table (``columns``: the modality's ``(header, key, format)`` quality columns)."""
    header = ["model", "steps", "utilisation %", "perplexity", *(h for h, _, _ in columns)]
    rows = []
    for row in summary["rows"]:
        m = row["metrics"]
        rows.append([row["label"], fmt_stat(m["steps"], "0f"), fmt_stat(m.get("utilization"), "pct"),
                     fmt_stat(m.get("perplexity"), "0f"), *(fmt_stat(m.get(k), f) for _, k, f in columns)])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                       *("| " + " | ".join(r) + " |" for r in rows)])
    dead = []
    for strategy, reports in summary.get("dead_codes", {}).items():
        live = ", ".join(f"{r['live']}" for r in reports)
        text = f"`{strategy}`: {live} live code(s) at the swap (seeds {', '.join(str(r['seed']) for r in reports)})"
        fits = [r["fit_relative"] for r in reports if r.get("fit_relative") is not None]
        if fits:
            text += ", live codes reproduced within " + ", ".join(f"{100 * f:.0f}%" for f in fits) + " of their spread"
        dead.append(text)
    seeds = summary["seeds"]
    paragraph = (
        f"The comparison's plain-VQ models at K={summary['codebook_size']} (seeds {', '.join(map(str, seeds))}) had "
        "their quantizer swapped by `simvq.retrofit(model, dead_codes=...)` for a SimVQ layer, then trained on with "
        "the same budget as every run; the control trains the same VQ model on as long without the swap. Which codes "
        f"are dead was decided on {summary.get('dead_code_items') or 'some'} training images. `keep` changes no "
        "output at the swap; `respread` keeps every live code and redraws the dead ones; `fresh` starts from a new "
        "random C. SimVQ from scratch is the comparison's own run: as many steps as the continuation, half the "
        "retrofitted models' total. Steps: the continuation's (the start row: the original run's). Mean ± sample "
        "standard deviation over the seeds."
        + (f" Dead codes: {'; '.join(dead)}." if dead else ""))
    return {"paragraph": paragraph, "table": table}


__all__ = ["RETROFIT_ROWS", "STRATEGY_ROWS", "TARGET_UTILIZATION", "retrofit_section", "retrofit_verdict",
           "summarise_retrofit"]
