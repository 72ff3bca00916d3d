"""A run's checkpoints on disk: finding, saving and loading them.

A checkpoint is ``RUN/checkpoints/checkpoint-N``: accelerate's ``save_state`` (models, optimiser,
scheduler, RNG, registered objects such as the EMA), one file per process for each per-process
state (the plugin's BatchRNG, a stream position), ``loop.json`` (the step, the layout, the non-finite
count and the run's id), the resolved recipe and the history so far. It is written into a temp
dir renamed into place, so one that looks complete is complete; resume picks the newest that
loads on every process, after comparing its recipe with the resumed one
(``rundir.recipe_changes``) and its layout with this run's (``layout.py``): a checkpoint another
recipe wrote is *incompatible*, named with the keys that differ, never reported as damaged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load

from ..errors import UserError
from . import state_files
from .engine import everyone, main_decides
from .layout import LAYOUT_KEYS, Layout, check_layout, saved_layout
from .rundir import covered, recipe_changes
from .runlog import write_history

CKPT_PREFIX = "checkpoint-"


def checkpoints(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """The run's complete checkpoints, oldest first; with ``run_id``, only those that run wrote
    (and those written before checkpoints named their run)."""
    ck = []
    for p in (run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*"):
        if not (p.is_dir() and (p / "loop.json").exists() and p.name[len(CKPT_PREFIX):].isdigit()):
            continue
        if run_id is not None:
            try:
                owner = json.loads((p / "loop.json").read_text()).get("run")
            except (OSError, ValueError, AttributeError):
                owner = None  # unreadable: load_checkpoint reports it as damaged
            if owner not in (None, run_id):
                continue
        ck.append(p)
    return sorted(ck, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_resume(run_dir: Path, resume: str | None, run_id: str | None = None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        ck = checkpoints(run_dir, run_id)
        return ck[-1] if ck else None
    p = Path(resume)
    if not (p / "loop.json").exists():
        raise UserError(f"train.resume is '{resume}', which is not a checkpoint dir (no loop.json); "
                          "give a checkpoints/checkpoint-N dir or 'latest'.")
    return p


def loop_state(ckpt: Path | None) -> dict:
    """The checkpoint's ``loop.json`` (step, non-finite steps); empty without a checkpoint."""
    return json.loads((ckpt / "loop.json").read_text()) if ckpt is not None else {}


def check_recipe(ckpt: Path, recipe: dict | None, allowed: list[str], layout: Layout | None = None) -> None:
    """One sentence when ``ckpt`` was written with a recipe that computes differently from
    ``recipe`` (checkpoints without a stored recipe are not compared), or on a layout this run
    cannot continue exactly (``layout.check_layout``); batch and accumulation may change when the
    global batch stays the same."""
    saved = ckpt / "recipe.yaml"
    old = None
    if saved.exists():
        try:
            old = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError):
            return  # the load itself will say what is wrong with the checkpoint
    old = old if isinstance(old, dict) else None
    then = saved_layout(ckpt, old)
    if layout is not None:
        check_layout(ckpt, then, layout, any(covered(k, allowed) for k in LAYOUT_KEYS))
        if then is not None and then.global_batch == layout.global_batch:
            allowed = [*allowed, *LAYOUT_KEYS]
    if recipe is None or old is None:
        return
    changes = recipe_changes(old, recipe, allowed)
    if changes:
        raise UserError(f"checkpoint {ckpt} is incompatible with this recipe: {', '.join(changes[:6])}"
                        f"{f' and {len(changes) - 6} more' if len(changes) > 6 else ''} changed; resume with the "
                        f"checkpoint's values ({saved}), or list the keys in train.resume_allow_changes to change them "
                        "on purpose.")


def check_sharding(ckpt: Path, fsdp: bool) -> None:
    """One sentence when the checkpoint's weights are FSDP shards (accelerate's distributed
    checkpoint dirs) and this run is not sharded, or the other way round."""
    sharded = any(ckpt.glob("pytorch_model_fsdp_*"))
    whole = any(ckpt.glob("model*.safetensors")) or any(ckpt.glob("pytorch_model*.bin"))
    if sharded and not fsdp:
        raise UserError(f"checkpoint {ckpt} holds FSDP-sharded weights; resume it under FSDP (accelerate launch "
                        "--config_file docs/accelerate/fsdp.yaml), or start without train.resume.")
    if fsdp and whole and not sharded:
        raise UserError(f"checkpoint {ckpt} was written without FSDP; resume it the way it was trained (DDP or one "
                        "process), or start without train.resume.")


def _incompatible(e: Exception) -> bool:
    """A load failure that says the checkpoint holds other modules or shapes (not a damaged file)."""
    text = str(e)
    return any(s in text for s in ("size mismatch", "Missing key", "Unexpected key", "missing keys", "unexpected keys",
                                   "not in the model", "loaded state dict contains", "number of parameter groups",
                                   "does not match the number of registered objects"))


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _load_state(accelerator: Accelerator, ck: Path, shared: dict, trust_pickles: bool) -> None:
    """accelerate's ``load_state`` (which reads its own files with torch's weights-only loader) and
    our shared states from their files. A checkpoint holding pickled custom state is refused unless
    the user trusts it; then accelerate unpickles it into the objects it was saved from, registered
    for this one load (from here on they are saved as files)."""
    pkl = pickled_custom_state(ck)
    if pkl and not trust_pickles:
        raise UserError(f"checkpoint {ck} holds pickled state ({', '.join(pkl)}), which runs code when loaded; resume "
                        "from a checkpoint this version wrote, or set train.resume_trust_pickles=true if you wrote it "
                        "yourself.")
    rng = ck / f"random_states_{accelerator.process_index}.pkl"
    if rng.exists():  # load_state skips an unreadable RNG file with a log line: the resume would not be exact
        accelerate_load(rng, weights_only=True)  # accelerate's own weights-only read; raises on a bad file
    if not pkl:
        accelerator.load_state(str(ck))
        missing = load_shared_states(ck, shared)
        if missing:
            raise UserError(f"checkpoint {ck} is incompatible with this recipe: it holds no {', '.join(missing)} state "
                            f"({missing[0]}.json), which this recipe trains; resume with the recipe it was written with "
                            "(its recipe.yaml) or start a new run in another output.dir.")
        return
    objs = list(shared.values())
    for o in objs:
        accelerator.register_for_checkpointing(o)
    try:
        accelerator.load_state(str(ck))
    finally:
        for o in objs:
            accelerator._custom_objects.remove(o)  # accelerate has no public unregister


def _attempt(accelerator: Accelerator, ck: Path, recipe: dict | None, allowed: list[str], shared: dict,
             trust_pickles: bool, layout: Layout | None) -> tuple[str, str] | None:
    """None when this process loaded ``ck``; else (``user`` | ``incompatible`` | ``damaged``, why)."""
    try:
        check_recipe(ck, recipe, allowed, layout)
        check_sharding(ck, accelerator.distributed_type == DistributedType.FSDP)
        _load_state(accelerator, ck, shared, trust_pickles)
        json.loads((ck / "loop.json").read_text())["step"]
    except UserError as e:
        return "user", str(e)
    except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint: damaged or incompatible
        return ("incompatible" if _incompatible(e) else "damaged"), _why(e)
    return None


def _agreed(accelerator: Accelerator, outcome):
    """(process, outcome) of the first process whose load failed, or None when every process
    loaded: all processes see every process's outcome, so they take the same path."""
    outcomes = everyone(accelerator, outcome)
    return next(((r, o) for r, o in enumerate(outcomes) if o is not None), None)


def load_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str | None, recipe: dict | None = None,
                    allowed: list[str] | None = None, run_id: str | None = None, shared: dict | None = None,
                    trust_pickles: bool = False, layout: Layout | None = None) -> Path | None:
    """Load the checkpoint ``resume`` names, after ``check_recipe``. For ``latest``, the main
    process lists the candidates and every process tries the same one: a checkpoint that fails to
    load on any process is named and every process tries the next older one, so all train on
    from the same step or all stop; an explicit checkpoint that fails anywhere, or one that holds
    other modules than this recipe builds, is a clear error on every process."""
    allowed, shared = allowed or [], shared or {}
    where = (lambda r: "") if accelerator.num_processes == 1 else (lambda r: f" on process {r}")
    if resume == "latest":
        tried = []
        for ck in map(Path, main_decides(accelerator, [str(p) for p in reversed(checkpoints(run_dir, run_id))])):
            failed = _agreed(accelerator, _attempt(accelerator, ck, recipe, allowed, shared, trust_pickles, layout))
            if failed is None:
                return ck
            rank, (kind, why) = failed
            if kind == "user":
                raise UserError(why)
            if kind == "incompatible":
                raise UserError(f"checkpoint {ck} is incompatible with the models this recipe builds ({why}); "
                                "resume with the recipe it was written with (its recipe.yaml) or start a new run "
                                "in another output.dir.")
            accelerator.print(f"warning: checkpoint {ck} is damaged{where(rank)} ({why}); trying the one before it")
            tried.append(ck.name)
        if tried:
            raise UserError(f"no checkpoint in {run_dir / 'checkpoints'} can be loaded ({', '.join(tried)} are "
                              "damaged); remove them or start without train.resume.")
        return None
    ck = resolve_resume(run_dir, resume, run_id)
    if ck is None:
        return None
    failed = _agreed(accelerator, _attempt(accelerator, ck, recipe, allowed, shared, trust_pickles, layout))
    if failed is not None:
        rank, (kind, why) = failed
        if kind == "user":
            raise UserError(why)
        what = "is incompatible with the models this recipe builds" if kind == "incompatible" else "cannot be loaded"
        raise UserError(f"checkpoint {ck} {what}{where(rank)} ({why}); give another checkpoint or "
                        "train.resume=latest.")
    return ck


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def space_problem(run_dir: Path, need: int, what: str) -> str | None:
    """A sentence when the disk of ``run_dir`` has less than ``need`` bytes (+10%) free for ``what``."""
    free = shutil.disk_usage(run_dir).free
    if free >= need * 1.1:
        return None
    return (f"only {free / 2**20:.0f} MiB are free on the disk of {run_dir}, and {what} needs about "
            f"{need / 2**20:.0f} MiB")


def _last_good(run_dir: Path, run_id: str | None) -> str:
    ck = checkpoints(run_dir, run_id)
    return (f"the last good checkpoint is {ck[-1]}; free space, then resume with train.resume=latest" if ck else
            "there is no checkpoint yet; free space (or choose an output.dir on another disk) and start again")


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, limit: int | None, history: list,
                    nonfinite_steps: int = 0, rank_states: list | None = None, run_id: str | None = None,
                    recipe_text: str | None = None, shared_states: dict | None = None,
                    layout: Layout | None = None) -> Path:
    """accelerate ``save_state`` into a temp dir renamed into place, so a kill mid-save never
    leaves a checkpoint that looks complete; then prune to ``limit``. The disk's free space is
    checked first against the run's newest checkpoint; a full disk (before or while writing) is
    one sentence naming the last good checkpoint, which stays, and the partial one is removed."""
    problem = None
    if accelerator.is_main_process:
        prev = checkpoints(run_dir, run_id)
        if prev:
            problem = space_problem(run_dir, dir_bytes(prev[-1]), f"checkpoint {step}")
    problem = main_decides(accelerator, problem)
    if problem:
        raise UserError(f"{problem}; {_last_good(run_dir, run_id)}.")
    tmp = run_dir / "checkpoints" / f".tmp-{CKPT_PREFIX}{step}"
    try:
        return _write_checkpoint(accelerator, run_dir, step, limit, history, nonfinite_steps, rank_states, run_id,
                                 recipe_text, shared_states, layout)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"checkpoint {step} could not be written in {run_dir / 'checkpoints'} "
                        f"({e.strerror or type(e).__name__}); {_last_good(run_dir, run_id)}.") from None


def _write_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, limit: int | None, history: list,
                      nonfinite_steps: int, rank_states: list | None, run_id: str | None, recipe_text: str | None,
                      shared_states: dict | None, layout: Layout | None) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for k, obj in enumerate(rank_states or []):  # per-process state: the plugin's BatchRNG, a stream position
        name = getattr(obj, "checkpoint_name", f"plugin_state_{k}")
        state_files.save_state(obj.state_dict(), tmp / f"{name}_rank{accelerator.process_index}")
    # the same in every process (the EMA); read by every process (under FSDP: gathered from the shards)
    shared = {name: obj.state_dict() for name, obj in (shared_states or {}).items()}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, state in shared.items():
            state_files.save_state(state, tmp / name)
        (tmp / "loop.json").write_text(json.dumps({"step": step, "nonfinite_steps": nonfinite_steps, "run": run_id,
                                                   "layout": layout.to_json() if layout else None}))
        if recipe_text is not None:
            (tmp / "recipe.yaml").write_text(recipe_text)
        write_history(tmp, history)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if limit:
            for old in checkpoints(run_dir, run_id)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_rank_states(accelerator: Accelerator, ckpt: Path, rank_states: list) -> None:
    """Each per-process state from this process's files in ``ckpt`` (no pickle: safetensors + JSON;
    a checkpoint from before them holds ``.pt`` files of tensors and numbers, read with torch's
    weights-only loader, which runs no code)."""
    for k, obj in enumerate(rank_states):
        name = getattr(obj, "checkpoint_name", f"plugin_state_{k}")
        own = ckpt / f"{name}_rank{accelerator.process_index}"
        # resumed on more processes: a shared state (the plugin's BatchRNG) is the same in every file
        stem = own if _has(own) or getattr(obj, "per_process", False) else ckpt / f"{name}_rank0"
        try:
            if state_files.exists(stem):
                obj.load_state_dict(state_files.load_state(stem))
            elif stem.with_suffix(".pt").exists():
                obj.load_state_dict(torch.load(stem.with_suffix(".pt"), weights_only=True))
        except Exception as e:  # noqa: BLE001 - a damaged or hostile file: one sentence, nothing runs
            raise UserError(f"checkpoint {ckpt}: the state {stem.name} cannot be read ({_why(e)}); give another "
                            "checkpoint in train.resume.") from None


def _has(stem: Path) -> bool:
    return state_files.exists(stem) or stem.with_suffix(".pt").exists()


def load_shared_states(ckpt: Path, shared_states: dict) -> list[str]:
    """Each shared state (the EMA) from its files; the names the checkpoint has no files for."""
    missing = []
    for name, obj in shared_states.items():
        if state_files.exists(ckpt / name):
            obj.load_state_dict(state_files.load_state(ckpt / name))  # a failure: the caller's damaged checkpoint
        else:
            missing.append(name)
    return missing


def pickled_custom_state(ckpt: Path) -> list[str]:
    """accelerate's custom-state files in ``ckpt`` (``custom_checkpoint_N.pkl``), which it can only
    unpickle in full (code in them would run)."""
    return sorted(p.name for p in ckpt.glob("custom_checkpoint_*.pkl"))
