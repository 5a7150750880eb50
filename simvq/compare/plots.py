"""PNG figures of the comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(variants: list[str]) -> dict:
    plt = _plt()
    # tab10, then Dark2 (distinct hues) beyond ten quantizers: no two lines of one report share a colour
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("Dark2")(i) for i in range(8)]
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)
    return f"{path.parent.name}/{path.name}"


def _main_runs(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind", "compare") == "compare" and r.get("status") == "ok"]


def _series(records: list[dict], key: str) -> tuple[list[int], list[list[float]]]:
    """Common steps and the per-seed values of a history key at those steps."""
    per_seed = []
    for r in records:
        pts = {h["step"]: h[key] for h in r.get("history", []) if key in h and "step" in h}
        per_seed.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    return steps, [[p[s] for s in steps] for p in per_seed]


def utilization_over_steps(results: dict, records: list[dict], path: Path) -> str | None:
    runs = _main_runs(records)
    sizes = sorted({r["requested_size"] for r in runs})
    variants = [v for v in results["spec"]["quantizers"] if any(r["variant"] == v for r in runs)]
    if not runs or not sizes:
        return None
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for v in variants:
            recs = [r for r in runs if r["variant"] == v and r["requested_size"] == size]
            steps, vals = _series(recs, "utilization")
            if not steps:
                continue
            t = torch.tensor(vals, dtype=torch.float64) * 100
            ax.plot(steps, t.mean(0).tolist(), label=recs[0]["label"], color=colors[v])
            if t.shape[0] > 1:
                ax.fill_between(steps, t.min(0).values.tolist(), t.max(0).values.tolist(), color=colors[v], alpha=0.2)
        ax.set_title(f"K = {size}")
        ax.set_xlabel("training step")
        ax.set_ylabel("codes used in the logging window (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    # one legend for every quantizer drawn (one that skipped the largest K still gets its entry)
    seen = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    axes[0][-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")
    fig.suptitle("Utilisation during training (line: mean over seeds, band: min-max)")
    return _save(fig, path)


def _uniform_ceiling(size: int, tokens: float) -> float:
    """Utilisation (%) that a quantizer using all ``size`` codes equally would show on ``tokens`` tokens:
    ``1 - (1 - 1/K)^T``. A finite sample misses codes, so this is the most a usage measurement can show."""
    return 100.0 * -math.expm1(tokens * math.log1p(-1.0 / size))


def codebook_scaling(results: dict, path: Path, panels: list[tuple]) -> str | None:
    """One panel per metric against K (log2 axis), mean ± std over seeds, per quantizer.

    A panel is ``(summary key, scale, axis label[, options])``; options: ``"log"`` (log y axis), ``"ceiling"``
    (utilisation: the dashed line a perfectly uniform quantizer would reach on the tokens counted, which
    matters when K approaches the number of held-out tokens). Panels whose metric no run has are left out.
    """
    summary = results["summary"]
    if not summary:
        return None
    panels = [pn for pn in panels if any(pn[0] in e["metrics"] for e in summary)]
    if not panels:
        return None
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for panel, ax in zip(panels, axes.flat):
        key, scale, ylabel = panel[:3]
        options = panel[3] if len(panel) > 3 else ()
        for v in results["spec"]["quantizers"]:
            pts = sorted(
                (e["codebook_size"], e["metrics"][key]) for e in summary if e["variant"] == v and key in e["metrics"]
            )
            if not pts:
                continue
            label = next(e["label"] for e in summary if e["variant"] == v)
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] * scale for p in pts]
            err = [(p[1]["std"] or 0.0) * scale for p in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=colors[v])
        if "ceiling" in options:
            pts = sorted({(e["codebook_size"], e["metrics"]["tokens"]["mean"]) for e in summary if "tokens" in e["metrics"]})
            if pts and any(_uniform_ceiling(k, t) < 99.5 for k, t in pts):
                ax.plot([k for k, _ in pts], [_uniform_ceiling(k, t) for k, t in pts], "k--", lw=1,
                        label="uniform use of K codes, same tokens")
            ax.set_ylim(0, 102)
        if "log" in options:
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both" if "log" in options else "major")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Codebook-size scaling (mean ± std over seeds)")
    return _save(fig, path)


def step_time(results: dict, path: Path) -> str | None:
    """The cost of a large codebook against the codebook size actually used, log-log, one line per quantizer:
    training seconds per step (``1 / steps_per_s``) and, when recorded, each run's peak memory (the search's
    buffers and, for IBQ, its ``(N, K)`` logits); mean ± std over seeds. None with fewer than two sizes."""
    summary = [e for e in results["summary"] if "steps_per_s" in e["metrics"]]
    if len({e["codebook_size"] for e in summary}) < 2:
        return None
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    memory = any("peak_memory_mb" in e["metrics"] for e in summary)
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(13 if memory else 6.5, 4.2), squeeze=False)
    panels = [("steps_per_s", lambda x: 1.0 / x if x > 0 else None, "training seconds per step")]
    if memory:
        panels.append(("peak_memory_mb", lambda x: x / 1024, "peak memory of the run (GiB)"))
    for (key, convert, ylabel), ax in zip(panels, axes.flat):
        for v in results["spec"]["quantizers"]:
            entries = sorted((e for e in summary if e["variant"] == v and key in e["metrics"]),
                             key=lambda e: e["codebook_size"])
            xs, ys, err = [], [], []
            for e in entries:
                per_seed = [y for y in (convert(x) for x in e["metrics"][key]["values"]) if y is not None]
                if not per_seed:
                    continue
                mean = sum(per_seed) / len(per_seed)
                xs.append(e["codebook_size"])
                ys.append(mean)
                err.append((sum((y - mean) ** 2 for y in per_seed) / (len(per_seed) - 1)) ** 0.5 if len(per_seed) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=entries[0]["label"], color=colors[v])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size K (codes actually used by the quantizer)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Cost of the codebook size (mean ± std over seeds)")
    return _save(fig, path)


def code_usage(results: dict, records: list[dict], path: Path) -> str | None:
    runs = _main_runs(records)
    if not runs:
        return None
    size = max(r["requested_size"] for r in runs)
    seed = min(r["seed"] for r in runs)
    chosen = []
    for v in results["spec"]["quantizers"]:
        rec = next((r for r in runs if r["variant"] == v and r["requested_size"] == size and r["seed"] == seed), None)
        if rec and rec.get("usage_counts") and Path(rec["usage_counts"]).is_file():
            chosen.append((rec, torch.load(rec["usage_counts"], weights_only=True)))
    if not chosen:
        return None
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rec, counts in chosen:
        c = counts.double().sort(descending=True).values
        frac = (c / c.sum().clamp_min(1)).clamp_min(1e-12)
        ranks = torch.arange(1, c.numel() + 1)
        ax.plot(ranks.tolist(), frac.tolist(), label=f"{rec['label']} (K={rec['codebook_size']})", color=colors[rec["variant"]])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-7)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of held-out tokens")
    ax.set_title(f"Sorted code usage, K = {size}, seed {seed} (unused codes drop off the bottom)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _to_image(x: torch.Tensor):
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def reconstructions(results: dict, records: list[dict], path: Path, count: int = 6) -> str | None:
    runs = _main_runs(records)
    if not runs:
        return None
    size = max(r["requested_size"] for r in runs)
    seed = min(r["seed"] for r in runs)
    rows = []
    for v in results["spec"]["quantizers"]:
        rec = next((r for r in runs if r["variant"] == v and r["requested_size"] == size and r["seed"] == seed), None)
        if rec and rec.get("reconstructions") and Path(rec["reconstructions"]).is_file():
            rows.append((rec["label"], torch.load(rec["reconstructions"], weights_only=True)))
    if not rows:
        return None
    originals = rows[0][1]["original"][:count]
    grid = [("original", originals)] + [(label, d["reconstruction"][:count]) for label, d in rows]
    plt = _plt()
    n = originals.shape[0]
    fig, axes = plt.subplots(len(grid), n, figsize=(1.3 * n + 1.2, 1.3 * len(grid)), squeeze=False)
    for i, (label, imgs) in enumerate(grid):
        for j in range(n):
            ax = axes[i][j]
            img = _to_image(imgs[j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Held-out reconstructions, K = {size}, seed {seed}", fontsize=9)
    return _save(fig, path)


def loss_curves(results: dict, records: list[dict], path: Path) -> str | None:
    runs = _main_runs(records)
    if not runs:
        return None
    size = max(r["requested_size"] for r in runs)
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # the reconstruction term the runs logged: log-mel L1 (audio tokenizers) or pixel L1
    mel = any("mel_loss" in h for r in runs for h in r.get("history", []))
    first = ("mel_loss", "log-mel L1 (train)") if mel else ("l1", "reconstruction L1 (train)")
    for key, title, ax in (first + (axes[0],), ("commitment", "commitment loss (train)", axes[1])):
        for v in results["spec"]["quantizers"]:
            recs = [r for r in runs if r["variant"] == v and r["requested_size"] == size]
            steps, vals = _series(recs, key)
            if not steps:
                continue
            t = torch.tensor(vals, dtype=torch.float64)
            ax.plot(steps, t.mean(0).tolist(), label=recs[0]["label"], color=colors[v])
        ax.set_title(f"{title}, K = {size}")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def retrofit_figure(retrofit: dict | None, path: Path, quality: tuple[str, str] = ("psnr_official_batch64", "PSNR (dB, batch-64)")) -> str | None:
    """Bars of held-out utilisation and quality per row of the retrofit summary, error bars the seed spread."""
    if not retrofit or "rows" not in retrofit:
        return None
    key, ylabel = quality
    rows = [r for r in retrofit["rows"] if r["metrics"].get("utilization", {}).get("n") and r["metrics"].get(key, {}).get("n")]
    if not rows:
        return None
    names = {"before": "VQ at swap", "control": "VQ trained on", "keep": "keep", "respread": "respread",
             "fresh": "fresh", "simvq": "SimVQ scratch"}
    colors = {"before": "#999", "control": "#ff7f0e", "keep": "#aec7e8", "respread": "#1f77b4", "fresh": "#2ca02c",
              "simvq": "#9467bd"}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [names.get(r["name"], r["name"]) for r in rows]
    for ax, metric_key, scale, label in ((axes[0], "utilization", 100, "held-out utilisation (%)"), (axes[1], key, 1, ylabel)):
        means = [scale * r["metrics"][metric_key]["mean"] for r in rows]
        errs = [scale * (r["metrics"][metric_key]["std"] or 0.0) for r in rows]
        ax.bar(labels, means, yerr=errs, capsize=3, color=[colors.get(r["name"], "#777") for r in rows])
        ax.set_ylabel(label)
        if metric_key == "utilization":
            ax.set_ylim(0, 102)
        elif key == "psnr_official_batch64":
            ax.set_ylim(max(0, min(means) - 3), None)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
        ax.grid(alpha=0.3, axis="y")
    seeds = retrofit.get("seeds") or []
    fig.suptitle(f"Retrofit of the trained plain-VQ models, K = {retrofit['codebook_size']} "
                 f"(mean ± std over {len(seeds)} seed{'' if len(seeds) == 1 else 's'})")
    fig.tight_layout()
    return _save(fig, path)


def _chosen_runs(results: dict, records: list[dict]) -> tuple[list[dict], int, int]:
    """The runs of the largest K and first seed, in the order of ``--quantizers``."""
    runs = _main_runs(records)
    if not runs:
        return [], 0, 0
    size = max(r["requested_size"] for r in runs)
    seed = min(r["seed"] for r in runs)
    chosen = []
    for v in results["spec"]["quantizers"]:
        rec = next((r for r in runs if r["variant"] == v and r["requested_size"] == size and r["seed"] == seed), None)
        if rec is not None:
            chosen.append(rec)
    return chosen, size, seed


def spectrograms(results: dict, records: list[dict], path: Path) -> str | None:
    """Log-mel spectrograms of held-out utterances: one row per utterance, the original and each quantizer."""
    chosen, size, seed = _chosen_runs(results, records)
    data = []
    for rec in chosen:
        if rec.get("reconstructions") and Path(rec["reconstructions"]).is_file():
            data.append((rec["label"], torch.load(rec["reconstructions"], weights_only=True)))
    if not data:
        return None
    from simvq.modalities.audio.spectral import MelSpectrogram, safe_log

    first = data[0][1]
    rate = int(first["sample_rate"])
    mel = MelSpectrogram(sample_rate=rate, n_fft=1024, hop_length=256, n_mels=80)
    columns = [("original", first["original"])] + [(label, d["reconstruction"]) for label, d in data]
    n_rows = len(first["original"])
    plt = _plt()
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(2.6 * len(columns) + 0.6, 2.0 * n_rows + 0.6), squeeze=False)
    with torch.no_grad():
        for i in range(n_rows):
            ref = safe_log(mel(first["original"][i].float()[None]))[0]
            vmin, vmax = float(ref.min()), float(ref.max())
            for j, (label, waves) in enumerate(columns):
                ax = axes[i][j]
                spec = ref if j == 0 else safe_log(mel(waves[i].float()[None]))[0]
                seconds = waves[i].shape[-1] / rate
                ax.imshow(spec.numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="magma",
                          extent=(0, seconds, 0, spec.shape[0]))
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(label, fontsize=9)
                if i == n_rows - 1:
                    ax.set_xlabel("seconds", fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"utterance {first['indices'][i]}", fontsize=8)
                ax.tick_params(labelsize=7)
    fig.suptitle(f"Held-out log-mel spectrograms (80 mel bands), K = {size}, seed {seed}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def quality_bars(results: dict, path: Path) -> str | None:
    """Bars per quantizer (largest K): held-out utilisation, PESQ, STOI and mel distance (mean ± std over seeds)."""
    summary = results["summary"]
    if not summary:
        return None
    size = max(e["requested_size"] for e in summary)
    entries = [e for v in results["spec"]["quantizers"] for e in summary if e["variant"] == v and e["requested_size"] == size]
    panels = [("utilization", 100.0, "utilisation (%)"), ("pesq", 1.0, "PESQ (wide-band)"), ("stoi", 1.0, "STOI"),
              ("mel_distance", 1.0, "mel distance (lower is better)")]
    panels = [p for p in panels if any(p[0] in e["metrics"] for e in entries)]
    if not entries or not panels:
        return None
    plt = _plt()
    colors = _colors(results["spec"]["quantizers"])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    for (key, scale, ylabel), ax in zip(panels, axes[0]):
        have = [e for e in entries if key in e["metrics"]]
        labels = [e["label"] for e in have]
        means = [e["metrics"][key]["mean"] * scale for e in have]
        errs = [(e["metrics"][key]["std"] or 0.0) * scale for e in have]
        ax.bar(labels, means, yerr=errs, capsize=3, color=[colors[e["variant"]] for e in have])
        ax.set_title(ylabel, fontsize=9)
        if key == "utilization":
            ax.set_ylim(0, 102)
        elif key == "pesq":
            ax.set_ylim(1.0, max(1.5, max(means) * 1.05))  # PESQ starts at 1.0
        else:
            ax.set_ylim(0, max(means) * 1.15 if means and max(means) > 0 else 1)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Held-out results per quantizer, K = {size}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def make_all(results: dict, records: list[dict], retrofit: dict | None, folder: Path, spec: dict) -> dict:
    """The figures ``spec`` (a modality's ``PLOTS``) names, as far as the data allows; returns
    ``{name: relative path}`` for the report (None for a figure not drawn)."""
    folder = Path(folder)
    sizes = {e["requested_size"] for e in results["summary"]}
    draw = {
        "utilization_over_steps": lambda p: utilization_over_steps(results, records, p),
        "codebook_scaling": lambda p: (codebook_scaling(results, p, spec["scaling_panels"])
                                       if len(sizes) >= spec["scaling_min_sizes"] else None),
        "step_time": lambda p: step_time(results, p),
        "code_usage": lambda p: code_usage(results, records, p),
        "reconstructions": lambda p: reconstructions(results, records, p),
        "quality": lambda p: quality_bars(results, p),
        "spectrograms": lambda p: spectrograms(results, records, p),
        "loss_curves": lambda p: loss_curves(results, records, p),
        "retrofit": lambda p: retrofit_figure(retrofit, p, spec["retrofit_quality"]),
    }
    return {name: draw[name](folder / f"{name}.png") for name in spec["figures"]}


__all__ = ["make_all"]
