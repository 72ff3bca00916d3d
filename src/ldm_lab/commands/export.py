"""``ldm-lab export``: a LoRA rewritten in the diffusers, PEFT or kohya layout (``lora``), LoRAs
fused into a base pipeline (``merge``), a pipeline as one original-layout checkpoint file
(``single-file``)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .. import lora_io, single_file
from ..errors import UserError
from .adapters import lora_args

WRITERS = {"diffusers": lora_io.write_diffusers, "peft": lora_io.write_peft, "kohya": lora_io.write_kohya}


def lora(args) -> int:
    (src, _), = lora_args([args.source])
    refuse_transformer_lora(Path(src))
    try:
        w = lora_io.read_lora(src)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read LoRA weights from '{src}' ({str(e).splitlines()[0][:200]}).") from None
    out = Path(args.out)
    target = out if args.format != "diffusers" or out.suffix == ".safetensors" else out / "pytorch_lora_weights.safetensors"
    if args.format == "kohya" and out.is_dir():
        raise UserError(f"--out '{args.out}' is a directory; give the kohya file's name, e.g. {out / 'lora.safetensors'}.")
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise UserError(f"--out '{args.out}' exists; choose a new name so nothing is overwritten.")
    try:
        out = WRITERS[args.format](w, out)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot write '{args.out}' ({e.strerror or type(e).__name__}); choose a writable path.") from None
    print(f"wrote {args.format} LoRA ({len(w.modules())} adapted modules) to {out}")
    return 0


def refuse_transformer_lora(src: Path) -> None:
    """``export lora`` converts UNet (+ text encoder) LoRAs; a transformer family's LoRA is one
    sentence saying how it loads as written."""
    if (src / "lycoris_weights.safetensors").is_file():
        raise UserError(f"'{src}' is a LoKr / LoHa run: it already holds lycoris_weights.safetensors (LyCORIS / kohya "
                        "keys for lycoris-lora, A1111, ComfyUI), comfyui_weights.safetensors and PEFT adapter dirs; "
                        "export lora converts LoRA files.")
    if lora_io.peft_adapter_dir(src) is not None:
        raise UserError(f"'{src}' is a PEFT adapter dir (a PixArt LoRA run's); it loads as written with "
                        "PeftModel.from_pretrained(pipe.transformer, DIR), and export lora converts UNet LoRA files "
                        "only so far.")
    f = src if src.is_file() else src / "pytorch_lora_weights.safetensors"
    try:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: read_lora below says so in its own words
        return
    if any(k.startswith("transformer.") for k in keys):
        raise UserError(f"'{src}' is a transformer LoRA (an SD3 LoRA run's); it loads as written with the "
                        "family pipeline's load_lora_weights, and export lora converts UNet LoRA files only so far.")


def merge(args) -> int:
    loras = lora_args(args.lora, args.scale)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' exists and is not empty; choose a new dir so nothing is overwritten.")
    try:
        lora_io.merge(args.base, loras, out)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot merge into '{args.base}' ({str(e).splitlines()[0][:200]}); give a pipeline "
                        "dir, run dir or hub id and LoRAs trained for it.") from None
    print(f"wrote fused pipeline to {out}")
    return 0


def single_file_checkpoint(args) -> int:
    src, out = Path(args.source), Path(args.out)
    if (src / "pipeline" / "model_index.json").exists():
        src = src / "pipeline"  # a run dir
    if out.suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors.")
    if out.exists():
        raise UserError(f"--out '{out}' exists; choose a new file name so nothing is overwritten.")
    dtype = single_file.DTYPES[args.dtype]
    try:
        state = single_file.pipeline_state(src)
    except single_file.SingleFileError as e:
        raise UserError(f"cannot write '{args.source}' as one checkpoint: {e}.") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a pipeline from '{args.source}' ({str(e).splitlines()[0][:200]}); give a "
                        "diffusers pipeline dir (saved without a weight variant) or a run dir holding pipeline/.") from None
    try:
        single_file.save(state, out, dtype)
    except OSError as e:
        raise UserError(f"cannot write '{out}' ({e.strerror or e}); free space or choose another path.") from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}; original SD layout)")
    differences = single_file.sd15_differences(src)
    if differences:
        print(single_file.not_sd15_note(differences, src))
    return 0
