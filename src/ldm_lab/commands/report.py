"""``ldm-lab report RUN``: rebuild the run's self-contained report.html and its artifacts' model cards
(README.md) from its files."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..trainers.report import write_report


def report(args) -> int:
    run = Path(args.run)
    if not run.is_dir() or not any((run / f).exists() for f in ("recipe.yaml", "history.jsonl", "metrics.json")):
        raise UserError(f"'{run}' is not a run dir (no recipe.yaml, history.jsonl or metrics.json); give the "
                        "output.dir of a run.")
    print(write_report(run))
    from ..trainers.model_card import write_model_cards

    for card in write_model_cards(run):
        print(card)
    return 0
