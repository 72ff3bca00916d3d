"""Per-bucket counts of an epoch (rows, batches, rows left over, empty and too-small buckets, dropped
images) for RUN/buckets.json, and a short human table of them for the log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .buckets import bucket_key

__all__ = ["bucket_report", "format_report"]

_EXAMPLES = 5  # dropped paths/keys listed per reason in the report


def bucket_report(bucket_of_row: Sequence[int | None], buckets: Sequence[Sequence[int]], batch_size: int,
                  dropped: Mapping[str, Sequence[str]] | None = None, drop_last: bool = True) -> dict:
    """Per-bucket counts for RUN/buckets.json (JSON-serialisable).

    ``buckets``: ``{"HxW": {index, height, width, rows, batches, leftover}}`` for the buckets that hold rows
    (``leftover``: rows not seen in an epoch with drop_last; with drop_last=False it is 0 and ``padded``
    gives the rows drawn twice), in bucket order; ``unused_buckets``: the names of the empty ones;
    ``small_buckets``: buckets with fewer rows than one batch, each also in ``warnings``; ``dropped``:
    ``{reason: {count, examples}}`` from ``dropped`` (reason -> paths/keys), and ``skipped_rows``: rows
    with bucket -1/None. Counts are per epoch of one process's view (the sampler's ``len``).
    """
    n = len(buckets)
    counts = [0] * n
    skipped = 0
    for b in bucket_of_row:
        if b is None or b < 0:
            skipped += 1
        elif b >= n:
            raise ValueError(f"bucket index {b} out of range for {n} buckets")
        else:
            counts[int(b)] += 1
    per: dict[str, dict[str, int]] = {}
    unused: list[str] = []
    small: list[str] = []
    warns: list[str] = []
    for i, (h, w) in enumerate(buckets):
        key, c = bucket_key((h, w)), counts[i]
        if c == 0:
            unused.append(key)
            continue
        full, rest = divmod(c, batch_size)
        entry = {"index": i, "height": int(h), "width": int(w), "rows": c}
        if drop_last:
            entry |= {"batches": full, "leftover": rest}
        else:
            entry |= {"batches": full + (rest > 0), "leftover": 0, "padded": (batch_size - rest) % batch_size}
        per[key] = entry
        if c < batch_size:
            small.append(key)
            fate = ("its rows are never trained on (drop_last)" if drop_last
                    else f"its one batch repeats rows to fill {batch_size}")
            warns.append(f"bucket {key} has {c} row{'s' * (c != 1)}, fewer than one batch of {batch_size}: {fate}")
    leftover = sum(e["leftover"] for e in per.values())
    rows = sum(counts)
    if drop_last and leftover:
        warns.append(f"{leftover} of {rows} rows ({100 * leftover / max(rows, 1):.1f}%) are left out of each epoch "
                     "(the last short batch of each bucket: a new draw every epoch, except in buckets smaller "
                     "than a batch)")
    drops = {reason: {"count": len(items), "examples": [str(x) for x in list(items)[:_EXAMPLES]]}
             for reason, items in (dropped or {}).items()}
    return {
        "batch_size": int(batch_size),
        "drop_last": bool(drop_last),
        "rows": rows,
        "batches_per_epoch": sum(e["batches"] for e in per.values()),
        "rows_per_epoch": sum(e["batches"] for e in per.values()) * batch_size,
        "leftover_rows": leftover,
        "buckets": per,
        "unused_buckets": unused,
        "small_buckets": small,
        "skipped_rows": skipped,
        "dropped": drops,
        "dropped_total": sum(d["count"] for d in drops.values()),
        "warnings": warns,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A short human table of :func:`bucket_report`; the first line is a one-line summary for the log."""
    per = report["buckets"]
    mode = "drop_last" if report["drop_last"] else "pad last"
    lines = [
        f"buckets: {len(per)} used of {len(per) + len(report['unused_buckets'])}, {report['rows']} rows, "
        f"{report['batches_per_epoch']} batches/epoch (batch {report['batch_size']}, {mode}), "
        f"{report['leftover_rows']} rows left over per epoch, {report['dropped_total']} images dropped"
    ]
    if per:
        lines.append(f"  {'HxW':>11} {'h/w':>5} {'rows':>7} {'batches':>7} {'leftover':>8}")
        for key, e in per.items():
            lines.append(f"  {key:>11} {e['height'] / e['width']:>5.2f} {e['rows']:>7} {e['batches']:>7} "
                         f"{e['leftover']:>8}{'  < one batch' if key in report['small_buckets'] else ''}")
    for reason, d in report["dropped"].items():
        more = ", ..." if d["count"] > len(d["examples"]) else ""
        lines.append(f"  dropped ({reason}): {d['count']}" + (f", e.g. {', '.join(d['examples'])}{more}"
                                                              if d["examples"] else ""))
    if report.get("skipped_rows"):
        lines.append(f"  rows without a bucket: {report['skipped_rows']}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
