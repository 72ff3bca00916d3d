"""``RUN/report.html``: one self-contained page per run (no network: images are inlined as data
URIs) with the recipe, the loss and metric curves, the sample grid of every validation step, the
final metrics and the timings. Written at the end of training; ``ldm-lab report RUN`` rebuilds it
from the run dir's files.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _pct(v) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else html.escape(str(v))


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _adherence_table(result: dict) -> str:
    splits = [s for s in ("seen", "heldout") if s in result]
    if not splits:
        return ""
    attrs = [a for a in ("color", "shape", "size", "position", "background", "all") if a in result[splits[0]]]
    head = "".join(f"<th>{a}</th>" for a in attrs)
    rows = "".join(f"<tr><th>{s} ({result[s].get('n', '')})</th>" +
                   "".join(f'<td class="num">{_pct(result[s][a])}</td>' for a in attrs) + "</tr>" for s in splits)
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def _flat_table(d: dict) -> str:
    rows = "".join(f'<tr><th>{html.escape(k)}</th><td class="num">{_num(v)}</td></tr>'
                   for k, v in d.items() if isinstance(v, (int, float, str)))
    return f"<table>{rows}</table>" if rows else ""


def _timings(history: list[dict]) -> dict:
    logged = [h for h in history if "loss" in h]
    if not logged:
        return {}
    last = logged[-1]
    out = {"steps": last["step"]}
    for k in ("wall_s", "train_s", "samples_per_s"):
        if k in last:
            out[k] = round(float(last[k]), 1)
    return out


def write_report(run_dir: Path) -> Path:
    """Build ``RUN/report.html`` from the run dir's recipe.yaml, history.jsonl, loss.png,
    metrics.png, samples/step-*.png and metrics.json (whatever of them exists)."""
    run_dir = Path(run_dir)
    parts = [f"<h1>ldm-lab run: {html.escape(run_dir.resolve().name)}</h1>"]
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()] \
        if (run_dir / "history.jsonl").exists() else []
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}

    timings = _timings(history)
    if timings:
        parts.append("<h2>Timings</h2>" + _flat_table(timings))
    final = metrics.get("shapes_eval")
    if final:
        parts.append("<h2>Final evaluation (shapes adherence)</h2>" + _adherence_table(final))
    other = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if other:
        parts.append("<h2>Final metrics</h2>" + _flat_table(other))
    evals = [h for h in history if any(k.startswith(("adherence/", "image/", "val_loss")) for k in h)]
    if evals:
        keys = sorted({k for h in evals for k in h if k.startswith(("adherence/seen/", "image/", "val_loss"))})
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        rows = "".join(f"<tr><td>{h['step']}</td>" + "".join(
            f'<td class="num">{h[k]:.4g}</td>' if k in h else "<td></td>" for k in keys) + "</tr>" for h in evals)
        parts.append(f"<h2>During training</h2><table><tr><th>step</th>{head}</tr>{rows}</table>")
    loss_caption = "training loss" + (", and the held-out validation loss" if any("val_loss" in h for h in history) else "")
    curves = [(run_dir / n, c) for n, c in (("loss.png", loss_caption),
                                            ("metrics.png", "adherence and image metrics at the evaluation steps"))]
    curves = [(p, c) for p, c in curves if p.exists()]
    if curves:
        parts.append("<h2>Curves</h2>" + "".join(f"<figure>{_img(p, c)}<figcaption>{c}</figcaption></figure>"
                                                 for p, c in curves))
    grids = sorted((run_dir / "samples").glob("step-*.png")) if (run_dir / "samples").is_dir() else []
    if grids:
        parts.append("<h2>Samples at each validation step</h2>" + "".join(
            f"<figure>{_img(g, g.stem)}<figcaption>{g.stem}</figcaption></figure>" for g in grids))
    if (run_dir / "eval" / "grid.png").exists():
        parts.append("<h2>Final evaluation samples</h2>" + _img(run_dir / "eval" / "grid.png", "evaluation grid"))
    if (run_dir / "recipe.yaml").exists():
        parts.append("<h2>Recipe</h2><pre>" + html.escape((run_dir / "recipe.yaml").read_text()) + "</pre>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ldm-lab report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = run_dir / REPORT
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def report_at_end(run_dir: Path, log, output=None) -> None:
    """At the end of a run whose artifacts are written: ``write_report`` and a model card in every
    artifact dir (a failure of either is a warning), then ``output.push_to_hub`` when set."""
    from .model_card import push_to_hub, write_model_cards

    try:
        write_report(run_dir)
    except (OSError, ValueError) as e:
        log(f"warning: report.html could not be written ({e}); rebuild it with ldm-lab report {run_dir}")
    try:
        write_model_cards(run_dir)
    except (OSError, ValueError) as e:
        log(f"warning: the model cards (README.md) could not be written ({e}); ldm-lab report {run_dir} writes them")
    if output is not None and output.push_to_hub:
        log(f"pushed to {push_to_hub(run_dir, output.push_to_hub, output.hub_private)}")
