"""``ldm-lab bench``: the arguments checked (variants named and parsed, overrides tried on the
recipe before anything runs), then ``ldm_lab.bench``'s training or sampling benchmark, printed and
written as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import bench as benchmark
from ..errors import UserError
from ..recipe import load_recipe

BUILT_IN_ROWS = ("naive", "ldm-lab")


def bench(args) -> int:
    out = Path(args.out)
    if args.sampling:
        return sampling(args, out)
    if not args.recipe:
        raise UserError("give a recipe to benchmark training, or --sampling PIPELINE.")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise UserError("--steps, --warmup and --rounds must be at least 1.")
    variants = parse_variants(args.variant)
    recipe = load_recipe(args.recipe, args.overrides)
    for ov in variants.values():  # a bad override is found before anything runs
        benchmark.apply_overrides(recipe, ov)
    if args.caption_counts:
        from ..bench_captions import caption_variants, parse_counts

        variants.update(caption_variants(recipe, parse_counts(args.caption_counts), out))
    report = benchmark.run(recipe, args.steps, args.warmup, args.compare, args.peak_tflops, out, variants,
                           rounds=args.rounds)
    report["command"] = "ldm-lab bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    table = benchmark.format_training(report)
    print(table)
    benchmark.write_json({**report, "table": table}, Path(args.json) if args.json else out / "training.json")
    return 0


def sampling(args, out: Path) -> int:
    if not Path(args.sampling).exists() and "/" not in args.sampling:
        raise UserError(f"--sampling '{args.sampling}' is not a pipeline dir or run dir.")
    report = benchmark.run_sampling(args.sampling, n=args.n, out=out / "sampling")
    print(benchmark.format_sampling(report))
    benchmark.write_json(report, Path(args.json) if args.json else out / "sampling.json")
    return 0


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE [KEY=VALUE ...]`` per --variant -> {name: overrides}; each name is also the
    name of the variant's output folder."""
    variants: dict[str, list[str]] = {}
    for v in items:
        name, _, ov = v.partition(":")
        name = name.strip()
        if not name or not ov.strip():
            raise UserError(f"--variant '{v}' is not NAME:KEY=VALUE [KEY=VALUE ...].")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"--variant name '{name}' is also the name of its output folder, so it cannot hold '/' "
                            "or '\\' or be '.' or '..': use letters, digits, '-' or '_'.")
        if name in BUILT_IN_ROWS or name in variants:
            taken = "is already used by another --variant" if name in variants else "names a built-in row"
            raise UserError(f"--variant name '{name}' {taken}: give each variant its own name.")
        variants[name] = ov.split()
    return variants
