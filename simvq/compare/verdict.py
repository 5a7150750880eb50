"""The verdict: who wins on what, by how much, with the seed spread; one function, parameterised by the
modality's ``VERDICT`` (its quality metrics and sentence shapes, in ``simvq.modalities.<name>.compare``)."""

from __future__ import annotations

from simvq.compare.modality import compare_module
from simvq.compare.retrofit_report import retrofit_verdict
from simvq.compare.summary import beyond_spread, fmt_stat, get, metric

#: SimVQ variants whose effect on SimVQ the verdict states
_ABLATIONS = (("simvq_mlp", "the MLP transform"), ("simvq_learn_c", "learning C as well as W"))


def _note(a: dict, b: dict, one_seed_note: bool) -> str:
    """``", within the seed spread"`` when the difference is smaller than the summed spreads (nothing when
    neither has a spread and the verdict says once that one seed gives none)."""
    if one_seed_note and (a.get("n") or 0) < 2 and (b.get("n") or 0) < 2:
        return ""
    return "" if beyond_spread(a, b) else ", within the seed spread"


def _usage_line(p: dict, size: int, su: dict, vu: dict, sim: dict, vq: dict) -> str:
    line = (f"K={size}: SimVQ uses {fmt_stat(su, 'pct')}% of its codes on held-out {p['held_out']}, plain VQ "
            f"{fmt_stat(vu, 'pct')}% ({100 * (su['mean'] - vu['mean']):+.1f} points{_note(su, vu, p['one_seed_note'])})")
    if p["perplexity"]:
        line += (f"; perplexity {fmt_stat(metric(sim, 'perplexity'), '0f')} against "
                 f"{fmt_stat(metric(vq, 'perplexity'), '0f')}")
    return line + "."


def _pair_parts(p: dict, sim: dict, vq: dict) -> list[str]:
    parts = []
    for key, label, kind, higher, unit in p["quality"]:
        a, b = metric(sim, key), metric(vq, key)
        if not a or not b:
            continue
        diff = a["mean"] - b["mean"]
        better = "" if diff == 0 else f", {'SimVQ' if (diff > 0) == higher else 'VQ'} better"
        parts.append(p["pair"].format(label=label, a=fmt_stat(a, kind), b=fmt_stat(b, kind), unit=unit, better=better,
                                      diff=f"{diff:+.{kind[0]}f}", note=_note(a, b, p["one_seed_note"])))
    return parts


def _rank_parts(p: dict, rows: list[dict]) -> list[str]:
    parts = []
    for key, label, kind, higher, unit in p["quality"]:
        have = [e for e in rows if metric(e, key)]
        if len(have) < p["rank_min_rows"]:
            continue
        ranked = sorted(have, key=lambda e: e["metrics"][key]["mean"], reverse=higher)
        top = ranked[0]
        words = dict(word="best" if higher else "lowest", label=label, top=top["label"], unit=unit,
                     value=fmt_stat(top["metrics"][key], kind))
        if len(ranked) < 2:
            parts.append(p["rank_alone"].format(**words))
            continue
        second = ranked[1]
        a, b = top["metrics"][key], second["metrics"][key]
        gap = f"{abs(a['mean'] - b['mean']):.{kind[0]}f}"
        if p["rank_level"] and gap == f"{0:.{kind[0]}f}":
            parts.append(p["rank_level"].format(second=second["label"], **words))
            continue
        within = _note(a, b, p["one_seed_note"])
        parts.append(p["rank"].format(gap=gap, second=second["label"], within=within,
                                      within_paren=" (within the seed spread)" if within else "", **words))
    return parts


def _size_lines(p: dict, summary: list[dict], size: int) -> list[str]:
    rows = [e for e in summary if e["requested_size"] == size and metric(e, "utilization")]
    if not rows:
        return []
    lines = []
    sim, vq = get(summary, "simvq", size), get(summary, "vq", size)
    if metric(sim, "utilization") and metric(vq, "utilization"):
        lines.append(_usage_line(p, size, metric(sim, "utilization"), metric(vq, "utilization"), sim, vq))
        parts = _pair_parts(p, sim, vq)
        if parts:
            lines.append(p["pairs_line"].format(size=size, parts="; ".join(parts)))
    ranks = _rank_parts(p, rows)
    if ranks or not p["rank_line_needs_quality"]:
        best_u = max(rows, key=lambda e: e["metrics"]["utilization"]["mean"])
        ranks.append(f"highest utilisation {best_u['label']} ({fmt_stat(best_u['metrics']['utilization'], 'pct')}%)")
        lines.append(f"K={size}: " + "; ".join(ranks) + ".")
    collapsed = [p["collapsed"].format(label=e["label"], util=fmt_stat(e["metrics"]["utilization"], "pct")) for e in rows
                 if e["metrics"]["utilization"]["mean"] < 0.1]
    if collapsed:
        lines.append(f"K={size}: collapsed (under 10% of codes used): {', '.join(collapsed)}.")
    q, q_label, _, _, q_unit = p["quality"][0]
    for v, what in _ABLATIONS:
        e = get(summary, v, size)
        if e and metric(e, "utilization") and metric(sim, "utilization"):
            du = e["metrics"]["utilization"]["mean"] - sim["metrics"]["utilization"]["mean"]
            dq = (e["metrics"][q]["mean"] - sim["metrics"][q]["mean"]) if metric(e, q) and metric(sim, q) else None
            lines.append(f"K={size}: {what} changes SimVQ's utilisation by {100 * du:+.1f} points"
                         + (f" and {q_label} by {dq:+.2f}{q_unit}" if dq is not None else "")
                         + f" ({e['label']}: {fmt_stat(e['metrics']['utilization'], 'pct')}%).")
    return lines + _cost_line(sim, vq, size)


def _cost_line(sim: dict | None, vq: dict | None, size: int) -> list[str]:
    """SimVQ's trainable quantizer parameters and speed against plain VQ, if known."""
    keys = ("steps_per_s", "quantizer_params_trainable")
    if not all(metric(e, k) for e in (sim, vq) for k in keys):
        return []
    ratio = sim["metrics"]["steps_per_s"]["mean"] / vq["metrics"]["steps_per_s"]["mean"]
    return [
        f"K={size}: cost: SimVQ trains {sim['metrics']['quantizer_params_trainable']['mean']:.0f} quantizer "
        f"parameters (VQ: {vq['metrics']['quantizer_params_trainable']['mean']:.0f}) and runs at {ratio:.2f}x "
        f"plain VQ's steps/s on this machine."
    ]


def _retrofit_line(p: dict, retrofit: dict) -> list[str]:
    """The retrofit experiment's sentences (``retrofit``: its summary, see simvq.compare.retrofit_report)."""
    return retrofit_verdict(p, retrofit)


#: the fewest codebook sizes that make the scaling sentences (with two, the per-K lines say it all)
SCALING_MIN_SIZES = 3
#: utilisation SimVQ should keep at every K (the paper: 100% from 1,024 to 262,144 codes)
SCALING_UTILISATION = 0.9


def _series(summary: list[dict], variant: str, key: str) -> list[tuple[int, int, dict]]:
    """``(requested K, K used, stats)`` of one metric of one quantizer, by K."""
    rows = sorted((e for e in summary if e["variant"] == variant and metric(e, key)), key=lambda e: e["requested_size"])
    return [(e["requested_size"], e["codebook_size"], e["metrics"][key]) for e in rows]


def _scaling_lines(p: dict, summary: list[dict], sizes: list[int]) -> list[str]:
    """Across K: does SimVQ keep its codes in use and gain quality with K, and where each baseline stops.

    "Stops scaling" is read from the numbers: the K after which the number of codes in use (utilisation x K)
    no longer grows, and the K of the best quality; both stated with the values.
    """
    if len(sizes) < SCALING_MIN_SIZES:
        return []
    key, label, kind, higher, unit = p["quality"][0]
    lines = []
    variants = list(dict.fromkeys(e["variant"] for e in summary))
    for v in variants:
        usage = _series(summary, v, "utilization")
        quality = _series(summary, v, key)
        if len(usage) < SCALING_MIN_SIZES:
            continue
        name = next(e["label"] for e in summary if e["variant"] == v)
        in_use = [(k, used, s["mean"] * used) for k, used, s in usage]
        peak_k, _, peak_n = max(in_use, key=lambda t: t[2])
        trend = " -> ".join(f"{n:,.0f}" for _, _, n in in_use)
        text = (f"Scaling, {name}: codes in use {trend} over K = {in_use[0][0]:,} .. {in_use[-1][0]:,} "
                f"(utilisation {100 * usage[0][2]['mean']:.1f}% -> {100 * usage[-1][2]['mean']:.1f}%)")
        if v == "simvq":
            low_k, _, low = min(usage, key=lambda t: t[2]["mean"])
            above = low["mean"] > SCALING_UTILISATION
            text += (f"; above {100 * SCALING_UTILISATION:.0f}% at every K: {'yes' if above else 'no'} (lowest "
                     f"{100 * low['mean']:.1f}% at K={low_k:,})")
        elif peak_k != in_use[-1][0]:
            text += f"; the number in use stops growing after K={peak_k:,} ({peak_n:,.0f} codes)"
        if len(quality) >= 2:
            values = [s["mean"] for _, _, s in quality]
            rising = all((b > a) == higher for a, b in zip(values, values[1:]))
            best_k, _, best = (max if higher else min)(quality, key=lambda t: t[2]["mean"])
            text += (f"; {label} {values[0]:.{kind[0]}f} -> {values[-1]:.{kind[0]}f}{unit}, "
                     + ("improving at every step of K" if rising else
                        f"best at K={best_k:,} ({best['mean']:.{kind[0]}f}{unit})"))
        lines.append(text + ".")
    return lines


def verdict(summary: list[dict], retrofit: dict | None, sizes: list[int], modality: str = "image") -> list[str]:
    """Sentences that state who wins on what, by how much, with the spread; all from the numbers."""
    p = compare_module(modality).VERDICT
    lines = [line for size in sizes for line in _size_lines(p, summary, size)]
    lines += _scaling_lines(p, summary, sizes)
    if p["low_quality"]:
        key, limit, text = p["low_quality"]
        values = [e["metrics"][key]["max"] for e in summary if metric(e, key)]
        if values and max(values) < limit:
            lines.append(text.format(limit=limit, highest=max(values)))
    if p["one_seed_note"] and summary and all(len(e["seeds"]) < 2 for e in summary):
        lines.append("One seed per run: the differences above carry no seed-spread estimate (add seeds, e.g. "
                     "--seeds 0,1,2, for mean ± spread).")
    diverged = [f"{e['label']} K={e['requested_size']} seeds {e['diverged']}" for e in summary if e["diverged"]]
    lines.append("Diverged runs (NaN/Inf): " + ("; ".join(diverged) if diverged else "none") + ".")
    if retrofit:
        lines += _retrofit_line(p, retrofit)
    return lines


__all__ = ["verdict"]
