"""The ``ldm-lab`` command line: every command, its flags and their help (``ldm_lab.cli`` parses
with this parser and calls ``ldm_lab.commands``)."""

from __future__ import annotations

import argparse
import math

from .recipe.choices import SAMPLER_NAMES


def _typed(name: str, convert, ok, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = name  # argparse names the type in its message
    return parse


count = _typed("count", int, lambda v: v >= 1, "a whole number of at least 1")
count0 = _typed("count", int, lambda v: v >= 0, "a whole number of at least 0")
seed_int = _typed("seed", int, lambda v: 0 <= v < 2**32, "a seed from 0 to 4294967295")
number = _typed("number", float, math.isfinite, "a finite number")

EXAMPLES = """\
examples:
  ldm-lab train recipes/shapes/t2i.yaml train.max_steps=200
  accelerate launch -m ldm_lab.train recipes/shapes/t2i.yaml
  ldm-lab recipe check recipes/shapes/t2i.yaml
  ldm-lab recipe show recipes/shapes/t2i.yaml data.resolution=64
  ldm-lab cache recipes/shapes/t2i.yaml                     # latents + caption embeddings, once, to disk
  ldm-lab bench --compare naive --rounds 5 recipes/shapes/t2i.yaml   # samples/s, breakdown, FLOPs, MFU vs naive
  ldm-lab bench --sampling data/pretrained/shapes-t2i       # latency and adherence per sampler
  torchrun --nproc_per_node 2 -m ldm_lab.cli train recipes/shapes/t2i.yaml   # 2 processes (see docs/scaling.md)
  ldm-lab data shapes --out data/shapes --n 2000 --seed 0
  ldm-lab data shapes --out data/hearts --n 500 --shapes circle,square,triangle,star,heart
  ldm-lab finetune lora --base data/pretrained/shapes-t2i --data data/hearts --out runs/lora --steps 300
  ldm-lab finetune dreambooth --base data/pretrained/shapes-t2i --instance-data data/subjects/purple-sparkle \\
      --instance-prompt "a large {id} star" --prior-preservation \\
      --class-prompt-file recipes/shapes/star-class-prompts.txt --lora --lr 1e-3 --steps 300 --out runs/db
  ldm-lab finetune controlnet --base data/pretrained/shapes-t2i --data data/shapes --out runs/cn --lr 3e-4 \\
      --batch-size 32 --steps 1200
  ldm-lab sample data/pretrained/shapes-t2i --controlnet runs/cn:1.0 --control-image mask.png --prompt "" --guess-mode
  ldm-lab sample runs/shapes-t2i --prompt "a large red circle at the center on a white background" --n 4
  ldm-lab eval shapes runs/shapes-t2i
"""


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=count, help="LoRA rank (plugin.rank; default 8)")
    p.add_argument("--alpha", type=number, help="LoRA alpha (plugin.alpha; default: the rank)")
    p.add_argument("--targets", help="attn | attn_ff | attn_ff_conv, or comma-separated module names")
    p.add_argument("--dropout", type=number, help="LoRA dropout")
    p.add_argument("--init", choices=["default", "gaussian", "pissa", "olora"], help="adapter initialisation")
    p.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA); the same as --adapter dora")
    p.add_argument("--adapter", choices=["lora", "dora", "lokr", "loha"],
                   help="adapter type (plugin.adapter; default lora): LoKr / LoHa write LyCORIS keys")
    p.add_argument("--factor", type=int, help="LoKr Kronecker factor (plugin.factor; default -1: as square as it divides)")


def _run_flags(p: argparse.ArgumentParser, lr: str, steps: int, batch: int, text: bool = True) -> None:
    """Training flags shared by the finetune commands (``text``: text-encoder lr and validation prompts)."""
    p.add_argument("--lr", type=number, help=f"learning rate (train.learning_rate; default {lr})")
    if text:
        p.add_argument("--text-encoder-lr", type=number, help="text-encoder learning rate (default: --lr)")
    p.add_argument("--steps", type=count, help=f"optimiser steps (train.max_steps; default {steps})")
    p.add_argument("--batch-size", type=count, help=f"train.batch_size (default {batch})")
    p.add_argument("--resolution", type=count, help="training resolution (default: the base's native one)")
    p.add_argument("--caption-column", help="data.caption_column (default text)")
    if text:
        p.add_argument("--validation-prompt", action="append", help="a validation prompt (repeatable)")
    p.add_argument("--resume", help="'latest' or a checkpoint dir")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="further dotted key=value recipe overrides")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-lab",
        description="Latent text-to-image training on the Hugging Face stack: one Accelerate loop, "
                    "plugin trainers, outputs that load in stock diffusers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train what a recipe describes (same as accelerate launch -m ldm_lab.train)")
    t.add_argument("recipe", help="a recipe .yaml (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")

    c = sub.add_parser("cache", help="encode a recipe's latents and caption embeddings once, to disk (split across "
                       "processes under torchrun / accelerate launch); training finds and uses the cache")
    c.add_argument("recipe", help="a recipe .yaml")
    c.add_argument("--out", help="write the cache to this dir (train with data.latent_cache=DIR); default: the "
                   "hash-named dir under data.cache_dir that training looks up by itself")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides (the same ones the training run will use)")

    b = sub.add_parser("bench", help="training throughput of a recipe (vs the naive per-step pipeline), or sampling "
                       "latency and adherence per sampler (--sampling)")
    b.add_argument("recipe", nargs="?", help="a recipe .yaml (training benchmark)")
    b.add_argument("--steps", type=count, default=20, help="timed steps per pipeline (default 20)")
    b.add_argument("--warmup", type=count0, default=3, help="untimed steps first (default 3)")
    b.add_argument("--compare", choices=["naive"], help="also run the naive pipeline (images decoded, autoencoder and "
                   "text encoder every step, no workers, no cache) in this process and print the ratio")
    b.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE ...",
                   help="also run the recipe with these overrides (repeatable), e.g. 'no-cl:train.channels_last=false'")
    b.add_argument("--caption-counts", metavar="N,N,...", help="also run the recipe from copies of its latent cache "
                   "holding N distinct captions each (random embeddings), e.g. 20000,200000: memory vs caption count")
    b.add_argument("--rounds", type=count, default=1, help="run every row N times, each in a fresh process, the order "
                   "reversed every other round, and report medians (for machines whose speed drifts; default 1: "
                   "every row once, in this process)")
    b.add_argument("--peak-tflops", type=number, help="the device's peak TFLOP/s for MFU (GPUs: data-sheet table)")
    b.add_argument("--sampling", metavar="PIPELINE", help="benchmark the samplers on this pipeline / run dir instead")
    b.add_argument("--n", type=count, default=48, help="--sampling: prompts per sampler (default 48)")
    b.add_argument("--out", default="runs/bench", help="where runs and results.json go (default runs/bench)")
    b.add_argument("--json", help="results file (default OUT/training.json or OUT/sampling.json)")
    b.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")

    r = sub.add_parser("recipe", help="check or show a recipe")
    rs = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rc = rs.add_parser("check", help="validate a recipe without loading any model")
    rc.add_argument("recipe")
    rc.add_argument("overrides", nargs="*")
    rsh = rs.add_parser("show", help="print the fully resolved recipe")
    rsh.add_argument("recipe")
    rsh.add_argument("overrides", nargs="*")

    d = sub.add_parser("data", help="make datasets")
    ds = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsh = ds.add_parser("shapes", help="write the procedural shapes world as a 🤗 imagefolder dataset")
    dsh.add_argument("--out", required=True)
    dsh.add_argument("--n", type=count, default=2000)
    dsh.add_argument("--seed", type=seed_int, default=0)
    dsh.add_argument("--resolution", type=count, default=64)
    dsh.add_argument("--heldout", action="store_true", help="write only the held-out colour-shape pairs")
    dsh.add_argument("--colors", help="comma-separated colours to draw from (default: the six base colours; "
                                      "pink is the extra one)")
    dsh.add_argument("--shapes", help="comma-separated shapes (default: circle,square,triangle,star; "
                     "heart and sparkle are extra)")
    dsh.add_argument("--sizes", help="comma-separated sizes (default: small,large)")
    dsh.add_argument("--positions", help="comma-separated positions, e.g. 'center,top left' (default: all nine)")
    dsh.add_argument("--backgrounds", help="comma-separated backgrounds (default: white,black,gray)")
    dsh.add_argument("--caption", help="caption template, e.g. 'a {size} {id} star at the {position} on a "
                     "{background} background' ({color} {shape} {size} {position} {background} are filled in, "
                     "anything else such as {id} is kept); default: the full shapes caption")

    rp = sub.add_parser("report", help="rebuild RUN/report.html: recipe, curves, sample grids, metrics, timings "
                        "on one self-contained page, and the README.md model card of every artifact dir")
    rp.add_argument("run", help="a run dir")
    e = sub.add_parser("eval", help="evaluate images")
    es = e.add_subparsers(dest="action", required=True, metavar="ACTION")
    esh = es.add_parser("shapes", help="read colour/shape/size/position/background back from images")
    esh.add_argument("path", help="a run dir, a samples dir (samples.jsonl) or a shapes dataset dir")
    esh.add_argument("--out", help="metrics.json to write (default: inside the path)")
    eae = es.add_parser("autoencoder", help="shapes adherence of an autoencoder's reconstructions")
    eae.add_argument("path", help="an AutoencoderKL dir (or a pipeline dir with vae/)")
    eae.add_argument("--n", type=count, default=256)
    eae.add_argument("--resolution", type=count, default=64)
    eim = es.add_parser("images", help="FID, KID, CMMD and CLIP score of a samples dir against real images, "
                        "in a CLIP model's feature space")
    eim.add_argument("path", help="a run dir (its eval/ samples) or a samples dir (samples.jsonl: file_name, text)")
    eim.add_argument("--features", required=True,
                     help="a CLIPModel + CLIPProcessor dir or hub id, e.g. data/pretrained/shapes-judge")
    eim.add_argument("--real", help="a dir of real images (metadata.jsonl or samples.jsonl); default: the shapes "
                     "world's ground truth drawn for each sample's caption")
    eim.add_argument("--out", help="a .json file for the numbers")

    f = sub.add_parser("finetune", help="fine-tune a pipeline with a plugin trainer (flags override a built-in recipe)")
    fs = f.add_subparsers(dest="action", required=True, metavar="TRAINER")
    fl = fs.add_parser("lora", help="LoRA adapters (PEFT) on the UNet and optionally the text encoder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fl.add_argument("--base", required=True, help="the pipeline to adapt: a diffusers pipeline dir, a run dir or a hub id")
    fl.add_argument("--data", required=True, help="an imagefolder dir (images + metadata.jsonl) or a hub dataset id")
    fl.add_argument("--out", required=True, help="run dir (gets pytorch_lora_weights.safetensors)")
    _adapter_flags(fl)
    fl.add_argument("--train-text-encoder", action="store_true", help="also put adapters on the text encoder")
    _run_flags(fl, lr="1e-4", steps=1000, batch=8)

    fd = fs.add_parser("dreambooth", help="bind a rare identifier to a subject from a few images (DreamBooth), "
                       "with prior preservation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fd.add_argument("--base", required=True, help="the pipeline to fine-tune: a diffusers pipeline dir, a run dir or a hub id")
    fd.add_argument("--instance-data", required=True, help="dir of the subject's images (captions from metadata.jsonl "
                    "or NAME.txt sidecars when present, else --instance-prompt)")
    fd.add_argument("--instance-prompt", help="caption with {id} where the identifier goes, e.g. 'a photo of {id} dog'")
    fd.add_argument("--identifier", help="'auto' (a rare single token, printed and saved in OUT/dreambooth.json) "
                    "or the token to use (default auto)")
    fd.add_argument("--class-prompt", action="append", help="class prompt, e.g. 'a photo of dog' (repeatable: cycled "
                    "over the class images)")
    fd.add_argument("--class-prompt-file", help="a text file with one class prompt per line (instead of --class-prompt)")
    fd.add_argument("--prior-preservation", action="store_true", help="train on class images generated by the base "
                    "too: loss = instance + λ·prior")
    fd.add_argument("--num-class-images", type=count0, help="class images to generate or reuse (default 100)")
    fd.add_argument("--prior-loss-weight", type=number, help="λ (default 1.0)")
    fd.add_argument("--class-dir", help="where class images and their manifest live (default OUT/class_images); "
                    "a dir of your own images without manifest.json is used as is")
    fd.add_argument("--out", required=True, help="run dir (gets pipeline/ in full mode, "
                    "pytorch_lora_weights.safetensors with --lora)")
    fd.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole UNet")
    _adapter_flags(fd)
    fd.add_argument("--train-text-encoder", action="store_true",
                    help="also train the text encoder (all weights; adapters with --lora)")
    _run_flags(fd, lr="5e-6, 1e-4 with --lora", steps=800, batch=1)

    fc = fs.add_parser("controlnet", help="a ControlNet (spatial control: masks, edges, ...) for a frozen base",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fc.add_argument("--base", required=True, help="the pipeline to control: a diffusers pipeline dir, a run dir or a hub id")
    fc.add_argument("--data", required=True, help="an imagefolder dir (images + metadata.jsonl) or a hub dataset id")
    fc.add_argument("--out", required=True, help="run dir (gets controlnet/)")
    g = fc.add_mutually_exclusive_group()
    g.add_argument("--conditioning-column", help="dataset column holding the control images (default conditioning_image)")
    g.add_argument("--preprocessor", choices=["canny"], help="compute the control image from the target instead")
    fc.add_argument("--controlnet", help="continue from this ControlNet (dir or hub id) instead of copying the UNet")
    fc.add_argument("--prompt-dropout", type=number, help="share of steps with the empty prompt (default 0.5)")
    _run_flags(fc, lr="1e-5", steps=5000, batch=4, text=False)

    x = sub.add_parser("export", help="convert LoRA files between layouts, fuse LoRAs into a pipeline, or write a "
                                      "pipeline as one A1111/ComfyUI checkpoint file")
    xs = x.add_subparsers(dest="action", required=True, metavar="ACTION")
    xl = xs.add_parser("lora", help="write a LoRA in the diffusers, PEFT or kohya (A1111/ComfyUI) layout")
    xl.add_argument("source", help="a LoRA .safetensors file or a run dir holding pytorch_lora_weights.safetensors")
    xl.add_argument("--format", required=True, choices=["diffusers", "peft", "kohya"])
    xl.add_argument("--out", required=True, help="output file (.safetensors; a dir for --format peft)")
    xm = xs.add_parser("merge", help="fuse LoRAs into a base pipeline and save the result")
    xm.add_argument("--base", required=True, help="a pipeline dir, run dir or hub id")
    xm.add_argument("--lora", required=True, action="append", help="FILE[:scale] (repeatable)")
    xm.add_argument("--scale", type=number, default=None, help="scale of every --lora given without its own")
    xm.add_argument("--out", required=True, help="new pipeline dir")
    xf = xs.add_parser("single-file", help="write an SD 1.x / 2.x-class pipeline as one original-layout .safetensors "
                                           "checkpoint (A1111, ComfyUI, Forge, kohya; diffusers' from_single_file)")
    xf.add_argument("source", help="a diffusers pipeline dir or a run dir holding pipeline/")
    xf.add_argument("--out", required=True, help="new .safetensors file")
    xf.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights' precision in the file")

    ep = es.add_parser("pipeline", help="sample the fixed shapes evaluation prompts from a pipeline and score them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ep.add_argument("source", help="a run dir, a diffusers pipeline dir or a hub id")
    ep.add_argument("--out", required=True, help="dir for samples/, samples.jsonl, grid.png and metrics.json")
    ep.add_argument("--world", help="a shapes dataset dir whose world.json gives the palettes and held-out pairs")
    ep.add_argument("--colors", help="ask only for these colours (comma-separated), e.g. pink")
    ep.add_argument("--shapes", help="ask only for these shapes (comma-separated)")
    ep.add_argument("--n", type=count, default=240, help="prompts from seen colour-shape pairs")
    ep.add_argument("--heldout-n", type=count0, default=0, help="prompts from held-out pairs")
    ep.add_argument("--lora", action="append", default=[], help="FILE[:scale] LoRA to apply (repeatable)")
    ep.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpm++")
    ep.add_argument("--steps", type=count, default=20)
    ep.add_argument("--guidance", type=number, default=4.0)
    ep.add_argument("--seed", type=seed_int, default=1234)

    ec = es.add_parser("controlnet", help="how well a ControlNet places the shape its control image shows (IoU), "
                                          "with no prompt, the matching one and a conflicting one, against the base")
    ec.add_argument("source", help="a ControlNet run dir (its recipe gives the base and the control kind) or a "
                                   "ControlNet dir (then give --base and --kind)")
    ec.add_argument("--out", required=True, help="dir for the images of every prompt set and metrics.json")
    ec.add_argument("--base", help="the base pipeline (a pipeline dir, run dir or hub id; default: the run's)")
    ec.add_argument("--kind", choices=["mask", "edges", "canny"],
                    help="the control: the object's mask, the shapes edges, or Canny edges (default: the run's)")
    ec.add_argument("--n", type=count, help="fresh shapes rows per prompt set (default: the run's plugin.eval_n, else 64)")
    ec.add_argument("--sampler", choices=SAMPLER_NAMES)
    ec.add_argument("--steps", type=count)
    ec.add_argument("--guidance", type=number)
    ec.add_argument("--seed", type=seed_int)

    s = sub.add_parser("sample", help="generate images from a run or a diffusers pipeline dir")
    s.add_argument("source", help="a run dir (uses RUN/pipeline) or a pipeline dir / hub id")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    s.add_argument("--n", type=count, default=1, help="images per prompt")
    s.add_argument("--steps", type=count, default=None, help="sampler steps (default: the sampler's usual count)")
    s.add_argument("--guidance", type=number, default=4.0)
    s.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpm++")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--out", default=None, help="output dir (default: SOURCE/samples-cli)")
    s.add_argument("--lora", action="append", default=[], help="FILE[:scale] LoRA to apply (repeatable)")
    s.add_argument("--controlnet", action="append", default=[], help="DIR[:scale] ControlNet (repeatable: "
                   "several are composed by summing their scaled residuals)")
    s.add_argument("--control-image", action="append", default=[], help="control image, one per --controlnet, in order")
    s.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional branch only, residuals "
                   "weighted from 0.1 (coarse) to 1.0 (fine) across resolutions: the paper's CFG resolution "
                   "weighting, for prompt-less sampling")
    return p
