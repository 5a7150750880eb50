"""Figures of the comparison report, checked on what they draw rather than on pixels."""

from __future__ import annotations

from simvq.compare import plots


def _record(variant: str, label: str, size: int, seed: int) -> dict:
    history = [{"step": s, "utilization": 0.1 * s / 100 + 0.01 * seed} for s in (25, 50, 75)]
    return {"kind": "compare", "status": "ok", "variant": variant, "label": label, "requested_size": size,
            "codebook_size": size, "seed": seed, "history": history}


def test_utilisation_legend_names_a_quantizer_missing_from_the_largest_size(tmp_path, monkeypatch):
    # IBQ runs at K = 1,024 only (a size limit): its line is in the first panel, and the one legend (drawn in
    # the last panel) must still name it
    records = [_record(v, lbl, k, s) for v, lbl in (("simvq", "SimVQ"), ("vq", "VQ")) for k in (1024, 4096)
               for s in (0, 1)]
    records += [_record("ibq", "IBQ", 1024, s) for s in (0, 1)]
    results = {"spec": {"quantizers": ["simvq", "vq", "ibq"]}}
    drawn = {}

    def keep(fig, path):
        drawn["axes"] = fig.axes
        return str(path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.utilization_over_steps(results, records, tmp_path / "u.png")
    first, last = drawn["axes"]
    assert [line.get_label() for line in first.get_lines()] == ["SimVQ", "VQ", "IBQ"]
    assert [line.get_label() for line in last.get_lines()] == ["SimVQ", "VQ"]
    assert [t.get_text() for t in last.get_legend().get_texts()] == ["SimVQ", "VQ", "IBQ"]
    # the band of the two seeds spans their values: 0.1 * step / 100 (+ 0.01 for seed 1), in percent
    ys = first.get_lines()[0].get_ydata()
    assert [round(float(y), 6) for y in ys] == [3.0, 5.5, 8.0]
