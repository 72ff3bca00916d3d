"""The report of the rows the checks skipped: the reasons, its shape (shared by
:func:`~ldm_lab.data.checks.check_rows` and :class:`~ldm_lab.data.stream_checks.SkipCounter`),
:func:`summary` (one log line) and :func:`require_rows` (a UserError that says what to do when no
row is left).

A report is JSON-serialisable::

    {"rows": N_in, "kept": N_out, "min_size": m,
     "skipped": {"unreadable": n, "too_small": n, "empty_caption": n, "duplicate": n},
     "examples": {reason: [{"row": i, "path": p or None, "error": text}, ...first 5], ...}}
"""

from __future__ import annotations

import os

from ..errors import UserError

REASONS = ("unreadable", "too_small", "empty_caption", "duplicate")
MAX_EXAMPLES = 5


def _new_report(n: int = 0) -> dict:
    return {"rows": n, "kept": 0, "skipped": dict.fromkeys(REASONS, 0), "examples": {r: [] for r in REASONS}}


def _label(example: dict) -> str:
    return os.path.basename(example["path"]) if example.get("path") else f"row {example['row']}"


def _count_text(reason: str, n: int) -> str:
    if reason == "empty_caption":
        return f"{n} empty caption{'s' if n != 1 else ''}"
    if reason == "duplicate":
        return f"{n} duplicate{'s' if n != 1 else ''}"
    return f"{n} {reason.replace('_', ' ')}"


def summary(report: dict) -> str:
    """One short log line: ``checked 12 rows: kept 5; skipped 3 unreadable (a.jpg, b.png, ...), ...``."""
    parts = []
    for reason in REASONS:
        n = report["skipped"].get(reason, 0)
        if not n:
            continue
        names = [_label(e) for e in report["examples"].get(reason, [])[:3]]
        more = ", ..." if n > len(names) else ""
        parts.append(_count_text(reason, n) + (f" ({', '.join(names)}{more})" if names else ""))
    rows = report["rows"]
    head = f"checked {rows} row{'s' if rows != 1 else ''}: kept {report['kept']}"
    return head + ("; skipped " + ", ".join(parts) if parts else "; nothing skipped")


def require_rows(report: dict) -> None:
    """Raise ``UserError`` (counts per reason and what to do) when the check kept no row."""
    if report["kept"]:
        return
    if not report["rows"]:
        raise UserError("the dataset has no rows; check data.path and data.split.")
    skipped = report["skipped"]
    counts = ", ".join(_count_text(r, n) for r, n in skipped.items() if n)
    todo = []
    if skipped.get("unreadable"):
        ex = report["examples"]["unreadable"][0]
        todo.append(f"replace or remove the unreadable files (e.g. {_label(ex)}: {ex['error']})")
    if skipped.get("too_small"):
        size = report.get("min_size")
        todo.append("lower data.min_image_size" + (f" (now {size})" if size else "") + " or use larger images")
    if skipped.get("empty_caption"):
        todo.append("add captions or set data.skip_empty_captions=false")
    raise UserError(f"no usable training rows: all {report['rows']} rows were skipped ({counts}); "
                      + "; ".join(todo) + ".")
