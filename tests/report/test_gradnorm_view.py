"""The ``gradnorm`` view on synthetic stored results: tables, and figures that keep every convention."""
from __future__ import annotations

import report_synth as syn
from sam_probe.report import gradnorm
from test_plots import by_stem, captured, check_figure, umask_022  # noqa: F401 - fixtures


def results(run: str, scale: float = 1.0, switch: int | None = None) -> list[dict]:
    out = []
    for s in range(0, 250, 50):
        parts = [("fc1.weight", 0.8 * scale / (1 + s / 50), 640), ("fc1.bias", 0.1 * scale, 10),
                 ("fc2.weight", 0.3 * scale, 100), ("fc2.bias", 0.0, 10)]
        per_tensor = [{"name": n, "norm": v, "n_params": k} for n, v, k in parts]
        per_module = [{"name": "fc1", "norm": ((parts[0][1]) ** 2 + parts[1][1] ** 2) ** 0.5, "n_params": 650},
                      {"name": "fc2", "norm": parts[2][1], "n_params": 110}]
        g = sum(p["norm"] ** 2 for p in per_tensor) ** 0.5
        hp = {"optimizer": "late-sam", "switch_step": switch} if switch is not None else {"optimizer": "sgd"}
        out.append({"path": f"{run}/step_{s:06d}.pt", "step": s, "loss": 2.0 / (1 + s), "accuracy": 0.5,
                    "grad_norm": g, "grad_max_abs": g / 3, "param_norm": 10.0, "relative": g / 10, "n_params": 760,
                    "per_tensor": per_tensor, "per_module": per_module, "source": syn.source(**hp),
                    "_meta": syn.meta("gradnorm", {}, step=s)})
    return out


def test_tables_name_the_largest_module_and_shares_add_up():
    rs = results("/runs/mlp-sgd")
    main, *per = gradnorm.tables_of(rs, per_layer="module")
    assert main.columns[:2] == ["run", "step"] and len(main.rows) == 5
    assert {row[-1] for row in main.rows} <= {"fc1", "fc2"}
    assert len(per) == 5 and per[0].columns[2] == "||g_m||"
    for t in per:
        assert abs(sum(row[3] for row in t.rows) - 100) < 1e-9
    assert len(gradnorm.tables_of(rs)) == 1 and gradnorm.tables_of([]) == []


def test_figures_over_steps_keep_the_conventions(captured, tmp_path):  # noqa: F811
    rs = results("/runs/mlp-sgd") + results("/runs/mlp-late-sam", scale=2.0, switch=100)
    written = gradnorm.plot(rs, tmp_path)
    assert {p.stem.split("__")[0] for p in written} == {"gradnorm", "gradnorm_modules"}
    figs = by_stem(captured)
    for stem, (fig, files) in figs.items():
        check_figure(stem, fig, files)
    main = next(fig for stem, (fig, _) in figs.items() if stem.split("__")[0] == "gradnorm")
    assert "gradient norm" in main._suptitle.get_text()
    assert gradnorm.plot([], tmp_path) == []
