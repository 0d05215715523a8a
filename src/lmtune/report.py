"""`lmtune report`: one HTML page with PNG plots of a run (or several runs overlaid) and its facts.

Also writes the results of `lmtune sweep` (trials table, best config as YAML, optimisation history and
parameter importances). Everything is drawn with matplotlib into PNG files next to the HTML page, which
links them by relative path, so the folder can be copied or served as is.
"""

from __future__ import annotations

import csv
import html
import sys
from pathlib import Path

from lmtune import files
from lmtune.config import ReportConfig
from lmtune.errors import LmtuneError
from lmtune.track import read_metrics

# (file, title, y label, metric keys): one plot each; validation metrics other than loss get their own
PLOTS = [("loss.png", "Training and validation loss", "loss", ("loss", "val_loss")),
         ("lr.png", "Learning rate", "learning rate", ("lr",)),
         ("speed.png", "Throughput", "tokens / s", ("tokens_per_s",))]


def report(cfg: ReportConfig) -> Path:
    """Check the run folders, draw the plots, write report.html; returns its path."""
    runs = [Path(r.strip()) for r in cfg.runs.split(",") if r.strip()]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise LmtuneError(f"{r}: no metrics.jsonl here; give a run folder written by finetune or pretrain")
    out = Path(cfg.out) if cfg.out else (runs[0] if len(runs) == 1 else Path("report"))
    if out.exists() and not out.is_dir():
        raise LmtuneError(f"--out {out} is a file: give a folder for report.html and its plots")
    series = {_label(r, runs): read_metrics(r) for r in runs}
    val_keys = sorted({k for rows in series.values() for row in rows for k in row
                       if k.startswith("val_") and k != "val_loss" and _is_num(row[k])
                       and k.replace("_", "").isalnum()})  # a key becomes a file name: letters, digits, _
    # report writes these files into --out (the run folder by default) and nothing else
    names = ["report.html"] + [f for f, *_ in PLOTS] + [f"{k}.png" for k in val_keys]
    inputs = [("run", (r / n).resolve()) for r in runs for n in ("metrics.jsonl", "run.json") if (r / n).exists()]
    files.check_outputs([("--out", out / n) for n in names], inputs + files.local_inputs(
        config=getattr(cfg, "_config_file", "")))
    with files.writing(f"--out {out}"):
        out.mkdir(parents=True, exist_ok=True)
    images = [p for p in (_plot(out / f, t, y, keys, series) for f, t, y, keys in PLOTS) if p]
    images += [p for p in (_plot(out / f"{k}.png", k, k, (k,), series) for k in val_keys) if p]
    facts = [_facts(r) for r in runs]
    body = "".join(f'<h2>{html.escape(t)}</h2><img src="{p.name}">' for p, t in
                   ((p, p.stem.replace("_", " ")) for p in images))
    page = _page("lmtune report: " + ", ".join(r.name for r in runs), _table(facts) + body)
    path = files.write_text(out / "report.html", page, f"--out {out / 'report.html'}")
    print(f"report: {path} ({len(images)} plots)", file=sys.stderr)
    return path


def _label(run: Path, runs: list[Path]) -> str:
    names = [r.name for r in runs]
    return run.name if names.count(run.name) == 1 else str(run)


def _plot(path: Path, title: str, ylabel: str, keys: tuple, series: dict) -> Path | None:
    """One PNG: each key of each run over steps (validation values as dots); None if nothing to draw."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for label, rows in series.items():
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if _is_num(r.get(key)) and _is_num(r.get("step"))]
            if pts:
                style = "o-" if key.startswith("val_") else "-"
                ax.plot(*zip(*pts), style, lw=1, ms=3, label=f"{label} {key}" if len(series) > 1 else key)
                drawn = True
    if drawn:
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        with files.writing(f"--out {path}", tmp):
            fig.savefig(tmp, dpi=90)
            tmp.replace(path)
    plt.close(fig)
    return path if drawn else None


def _is_num(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _facts(run: Path) -> dict:
    """The run's facts for the table: what ran, on what, how it ended."""
    try:
        info = files.read_json(run / "run.json") if (run / "run.json").is_file() else {}
    except LmtuneError as e:
        print(f"warning: {e}; the run's facts are left out", file=sys.stderr)
        info = {}
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    rows = read_metrics(run)
    steps = [r for r in rows if _is_num(r.get("loss")) and _is_num(r.get("step"))]
    vals = [r for r in rows if _is_num(r.get("val_loss"))]
    speeds = [r["tokens_per_s"] for r in steps if _is_num(r.get("tokens_per_s"))]
    facts = {"run": str(run), "verb": info.get("verb", "?"), "model": cfg.get("model") or cfg.get("model_size"),
             "task": cfg.get("task"), "started": info.get("started"), "parameters": info.get("parameters"),
             "trainable": info.get("trainable_parameters"), "steps": steps[-1]["step"] if steps else 0,
             "final loss": steps[-1]["loss"] if steps else None,
             "best val_loss": min(r["val_loss"] for r in vals) if vals else None,
             "tokens/s": sum(speeds) / len(speeds) if speeds else None,
             "peak MB": max((r["peak_mem_mb"] for r in steps if _is_num(r.get("peak_mem_mb"))), default=None),
             "learning rate": cfg.get("learning_rate"), "batch": cfg.get("batch_size"), "lora": cfg.get("lora"),
             "data sha256": ", ".join(str(h)[:12] for h in _mapping(info.get("data_sha256")).values()),
             "torch": _mapping(info.get("packages")).get("torch", info.get("torch")),
             "hardware": _mapping(info.get("hardware")).get("cpu")}
    return facts


def _mapping(v) -> dict:
    return v if isinstance(v, dict) else {}


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# Sweep results.

def write_sweep_report(study, cfg, base, metric: str, out: Path) -> None:
    """trials.csv (and the table on stdout), best.yaml, history.png, importance.png, report.html."""
    rows = trial_rows(study)
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
    print(_text_table(rows, metric))
    images = [p for p in (_plot_history(study, out / "history.png", metric),
                          _plot_importance(study, out / "importance.png")) if p]
    best_note = "no trial has finished yet"
    if any(t.state.name == "COMPLETE" for t in study.trials):
        best = study.best_trial
        write_best_yaml(cfg, best, out / "best.yaml")
        best_note = f"best: trial {best.number}, {metric} {best.value:.4g}, {best.params}; config in best.yaml"
    print(best_note, file=sys.stderr)
    body = (f"<p>{html.escape(best_note)}</p>" + _table(rows)
            + "".join(f'<h2>{p.stem}</h2><img src="{p.name}">' for p in images))
    (out / "report.html").write_text(_page(f"lmtune sweep {cfg.study_name}", body))


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        note = t.user_attrs.get("fail_reason", "")
        if t.state.name == "PRUNED" and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value, **t.params,
                     "seconds": round(seconds, 1) if seconds is not None else None, "note": note})
    return rows


def _text_table(rows: list[dict], metric: str) -> str:
    if not rows:
        return "no trials"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = {k: max(len(k if k != "value" else metric), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join((k if k != "value" else metric).ljust(widths[k]) for k in keys)]
    lines += ["  ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def write_best_yaml(cfg, best, path: Path) -> None:
    """The sweep's train: settings with the best trial's values: `lmtune finetune --config best.yaml` (or
    pretrain, the sweep's verb)."""
    import yaml

    settings = {**cfg.train, **best.params, "out": str(Path(cfg.out) / "best")}
    header = (f"# Best trial {best.number} of sweep '{cfg.study_name}' (value {best.value:.6g}).\n"
              f"# Run it with: lmtune {getattr(cfg, 'verb', 'finetune')} --config {path}\n")
    path.write_text(header + yaml.safe_dump(settings, sort_keys=False))


def _plot_history(study, path: Path, metric: str) -> Path | None:
    """Each finished trial's value (pruned ones at their last validation) and the best so far."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    if not done and not pruned:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        ax.plot([t.number for t in done], [t.value for t in done], "o", label="complete")
        pick = min if study.direction.name == "MINIMIZE" else max
        best = [pick(t.value for t in done if t.number <= d.number) for d in done]
        ax.step([t.number for t in done], best, where="post", label="best so far")
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "x", color="grey", label="pruned (last validation)")
    ax.set(title="Optimisation history", xlabel="trial", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_importance(study, path: Path) -> Path | None:
    """Parameter importances (PED-ANOVA: numpy only); needs a few finished trials with varied values."""
    import optuna

    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        print(f"note: no parameter importances ({str(e).splitlines()[0]})", file=sys.stderr)
        return None
    if not importances:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(title="Parameter importances", xlabel="importance (PED-ANOVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
