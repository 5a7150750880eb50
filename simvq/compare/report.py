"""The comparison report: ``results.json``, ``report.md`` (one Jinja2 template for every modality, filled from
the modality's report sections), ``report.html`` (the ``markdown`` package) and the verdict.

Every figure over seeds is given as ``mean ± sample standard deviation`` (and min-max in results.json);
with one seed the spread is shown as ``n/a``. Comparisons in the verdict say whether a difference is larger
than the seed spread (the sum of both standard deviations) or within it.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import platform
from pathlib import Path

import jinja2
import markdown
import torch

from simvq.compare import plots
from simvq.compare.generation import section_markdown as generation_section
from simvq.compare.modality import compare_module
from simvq.compare.records import merged_eval
from simvq.compare.retrofit_report import retrofit_section, summarise_retrofit
from simvq.compare.summary import SUMMARY_METRICS, fmt, fmt_stat, get, stats, summarise
from simvq.compare.variants import VARIANTS
from simvq.compare.verdict import verdict
from simvq.io import save_file_atomic
from simvq.modalities.audio.compare import PUBLISHED_LIBRITTS
from simvq.modalities.image.compare import PUBLISHED_IMAGENET

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("simvq.compare", "templates"), trim_blocks=True,
                                lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
                                undefined=jinja2.StrictUndefined)


def _environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other processes on a shared machine slow every run: timings mean little without it
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_report(spec, base: dict, records: list[dict], *, notes: list[str], retrofit: dict | None, out: Path,
                 wall_time_s: float, reused: int, parallel_runs: int | None = None, tuned: dict | None = None,
                 generation: dict | None = None) -> dict:
    """Write ``results.json``, the plots, ``report.md`` and ``report.html`` into ``out``; return the results.
    ``tuned``: the ``--tune`` section (:func:`simvq.compare.tuned.tuned_section`), or None."""
    out = Path(out)
    module = compare_module(base.get("modality", "image"))
    summary = summarise(records)
    sizes = sorted({e["requested_size"] for e in summary})
    retro = summarise_retrofit(retrofit, module.REPORT["retrofit_keys"])
    results = {
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": {
            "quantizers": list(spec.quantizers),
            "codebook_sizes": list(spec.codebook_sizes),
            "seeds": list(spec.seeds),
            "budget": spec.budget.text,
            "data": spec.data,
            "config": spec.config if not isinstance(spec.config, dict) else "(dict)",
            "eval_limit": spec.eval_limit,
            **{k: getattr(spec, k) for k in module.REPORT["spec_fields"]},
        },
        "base_config": base,
        "environment": _environment(),
        "wall_time_s": wall_time_s,
        "reused_runs": reused,
        "parallel_runs": parallel_runs,
        "notes": list(notes),
        "summary": summary,
        "verdict": verdict(summary, retro, sizes, modality=base.get("modality", "image"))
        + ([tuned["verdict_line"]] if tuned else []) + (list(generation["verdict"]) if generation else []),
        "retrofit": retro,
        **module.REPORT["published_json"](),
        "runs_wall_time_s_sum": sum(r.get("wall_time_s", 0.0) for r in records),
        "runs": [_portable(r, out) for r in records],
        **({"tuned": tuned} if tuned else {}),
        **({"generation": generation} if generation else {}),
    }
    save_file_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    figures = plots.make_all(results, records, retro, out / "plots", module.PLOTS)
    md = render_markdown(results, figures, VARIANTS)
    save_file_atomic(out / "report.md", md)
    save_file_atomic(out / "report.html", markdown_to_html(md, title="simvq compare report"))
    return results


def _portable(record: dict, out: Path) -> dict:
    """A run record with its file paths relative to the report folder (the folder can move)."""
    rec = dict(record)
    for key in ("model_dir", "reconstructions", "usage_counts"):
        if rec.get(key):
            try:
                rec[key] = str(Path(rec[key]).resolve().relative_to(Path(out).resolve()))
            except ValueError:
                pass
    return rec


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(metrics: dict, key: str, kind: str, how: str) -> str:
    if how == "kilo":  # a rate in thousands (bit/s -> kbps), the mean alone
        return fmt(metrics[key]["mean"] / 1000, kind) if key in metrics else "n/a"
    return fmt_stat(metrics.get(key), kind)


def _coverage_cell(metrics: dict) -> str:
    """Held-out tokens of the usage pass and the Good-Turing coverage (lowest over seeds): near 1, more tokens
    would not reveal more codes in use."""
    if "sample_coverage" not in metrics or "tokens" not in metrics:
        return "n/a"
    return f"{metrics['tokens']['mean']:,.0f} ({metrics['sample_coverage']['min']:.3f})"


def _results_table(results: dict, report: dict) -> str:
    """One row per (codebook size, quantizer): usage, the modality's quality columns, then the run's costs."""
    quality = report["columns"](results)
    summary = results["summary"]
    coverage = any("sample_coverage" in e["metrics"] for e in summary)  # reports written before it was measured lack it
    levels = any("level_utilization" in e["metrics"] for e in summary)
    header = ["quantizer", "K", "utilisation %", *(["usage tokens (Good-Turing coverage)"] if coverage else []),
              *(["utilisation % per level"] if levels else []), "perplexity", "dead codes", *(c[0] for c in quality),
              "steps", "steps/s", "quantizer params (trainable)", "diverged"]
    rows = []
    for size in sorted({e["requested_size"] for e in summary}):
        for v in results["spec"]["quantizers"]:
            e = get(summary, v, size)
            if e is None:
                continue
            mt = e["metrics"]
            extra = [_coverage_cell(mt)] if coverage else []
            if levels:
                extra.append(" / ".join(fmt(s["mean"], "pct") for s in mt["level_utilization"])
                             if "level_utilization" in mt else "n/a")
            rows.append([e["label"], str(e["codebook_size"]), fmt_stat(mt.get("utilization"), "pct"), *extra,
                         fmt_stat(mt.get("perplexity"), "0f"), fmt_stat(mt.get("dead_codes"), "0f"),
                         *(_cell(mt, key, kind, how) for _, key, kind, how in quality),
                         fmt_stat(mt.get("steps"), "0f"), fmt_stat(mt.get("steps_per_s"), report["steps_per_s_format"]),
                         fmt(mt["quantizer_params_trainable"]["mean"], "0f") if "quantizer_params_trainable" in mt else "n/a",
                         f"{len(e['diverged'])}/{len(e['seeds'])}"])
    return _table(header, rows)


def _retrofit_section(r: dict | None, columns: list[tuple[str, str, str]]) -> dict | None:
    if not r:
        return None
    if "rows" in r:  # every strategy over every seed; below: one seed, the exact swap (earlier results.json)
        return retrofit_section(r, columns)
    rows = []
    for name, key in (("trained plain VQ (before)", "before"), ("retrofitted to SimVQ, trained on", "after_retrofit"),
                      ("plain VQ trained on (control)", "control_vq_trained_on")):
        x = r[key]
        rows.append([name, str(x.get("steps")), fmt(x.get("utilization"), "pct"), fmt(x.get("perplexity"), "0f"),
                     *(fmt(x.get(k), f) for _, k, f in columns)])
    paragraph = (f"A plain-VQ model (K={r['codebook_size']}, seed {r['seed']}) from the runs above, its quantizer "
                 "swapped by `simvq.retrofit(model)` for a SimVQ layer whose frozen C is the old codebook and whose W "
                 "starts at the identity (outputs unchanged at the swap), then trained on; the control trains the "
                 "same VQ model on for as many steps without the swap.")
    header = ["model", "total steps", "utilisation %", "perplexity", *(h for h, _, _ in columns)]
    return {"paragraph": paragraph, "table": _table(header, rows)}


def _generated(results: dict, report: dict) -> str:
    env = results["environment"]
    load = env.get("load_average_1_5_15min") if report["load_average"] else None
    return (f"Generated {results['created']} by `simvq compare` in {results['wall_time_s'] / 60:.1f} min "
            f"({results['reused_runs']} run(s) reused from an earlier invocation; the runs' own wall times add up to "
            f"{results['runs_wall_time_s_sum'] / 60:.1f} min, run side by side) on {env['platform']}, torch "
            f"{env['torch']}, {env['cpu_count']} CPU(s)" + (f", {env['cuda']}" if env["cuda"] else "")
            + (f"; load average at the end {load[0]:.1f} (other processes share the CPU when it exceeds "
               f"{env['cpu_count']})" if load else "") + ".")


def _setup(results: dict, report: dict) -> list[str]:
    spec, env = results["spec"], results["environment"]
    if "minutes" not in spec["budget"]:
        budget = (f"Same model, data, steps and seeds for every quantizer; only the quantizer changes. Budget: "
                  f"{spec['budget']} per run; seeds {spec['seeds']}; codebook sizes {spec['codebook_sizes']}.")
    else:
        budget = (f"Same model, data and seeds for every quantizer; only the quantizer changes. Budget: "
                  f"{spec['budget']}, split evenly across runs: every run trains for the same wall time, so faster "
                  f"quantizers take more steps (see the steps column); seeds {spec['seeds']}; codebook sizes "
                  f"{spec['codebook_sizes']}.")
    lines = [budget, *report["setup_lines"](results), report["spread"]]
    if report["timing"] and results.get("parallel_runs"):
        n = results["parallel_runs"]
        lines.append(f"Timing: {n} run{'' if str(n) == '1' else 's'} trained side by side as one-thread processes on "
                     f"{env['cpu_count']} CPU core(s); steps/s and wall times are per run under that sharing (and "
                     "under any other load on the machine), so they compare runs of one report, not machines.")
    lines += [f"Note: {note}" for note in results["notes"]]
    lc = [r.get("lc_codebook") for r in results["runs"] if r.get("lc_codebook")]
    if lc:
        lines.append(f"VQGAN-LC frozen codebook: {lc[0]}.")
    return lines


def render_markdown(results: dict, figures: dict, variants: dict) -> str:
    """``report.md`` from a ``results.json`` content and the figures drawn (``{name: relative path}``)."""
    report = compare_module(results["base_config"].get("modality", "image")).REPORT
    published = report["published"](results)
    return _TEMPLATES.get_template("report.md.j2").render(
        title=report["title"],
        generated=_generated(results, report),
        verdict=results["verdict"],
        setup=_setup(results, report),
        results_table=_results_table(results, report),
        after_table=report["after_table"],
        quantizers=[f"**{variants[v].label}** (`{v}`): {variants[v].note}." for v in results["spec"]["quantizers"]
                    if variants.get(v)],
        retrofit=_retrofit_section(results.get("retrofit"), report["retrofit_columns"]),
        figures=[(caption, figures[key]) for key, caption in report["figures"](results) if figures.get(key)],
        published={**published, "table": _table(published["header"], published["rows"])},
        tuned=results.get("tuned"),
        generation=generation_section(results.get("generation")),
    )


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
          "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
          "td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 3px}img{max-width:100%}")


def markdown_to_html(md: str, *, title: str) -> str:
    """A standalone HTML page of a Markdown report (the ``markdown`` package with its tables extension)."""
    body = markdown.markdown(md, extensions=["tables"], output_format="html")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


__all__ = ["PUBLISHED_IMAGENET", "PUBLISHED_LIBRITTS", "SUMMARY_METRICS", "fmt_stat", "markdown_to_html", "merged_eval",
           "render_markdown", "stats", "summarise", "verdict", "write_report"]
