"""What the generating commands (generate, img2img, inpaint, depth2img, upscale) share: their options, loading
the model, reading input images, and turning a pipeline's events into a progress bar and PNG files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from stablekit.atomic import WriteError, check_writable
from stablekit.engines import ENGINES, PRECISIONS
from stablekit.images import load_image, save_png
from stablekit.pipelines import DTYPES, Event, Generated, GenerationParams, Notice, Pipeline, Progress
from stablekit.pipelines.networks import add_embedding_files, add_lora, parse_lora_option
from stablekit.pipelines.params import Limits
from stablekit.safety import SAFETY_ACTIONS
from stablekit.watermark import MIN_SIDE, WATERMARKS, Watermarker, default_watermark
from stablekit.weights.safety import load_safety_checker

DEMO_MODEL = "model (coloured shapes only)"
_LIMIT_FLAGS = {  # Limits field -> help
    "max_pixels": "most pixels per output image",
    "max_batch_pixels": "most pixels sampled together (images x width x height)",
    "max_images": "most images in one run",
    "max_steps": "most sampling steps",
    "max_prompt_chars": "longest prompt in characters",
}


def add_model_options(p: argparse.ArgumentParser, *, default_help: str) -> None:
    p.add_argument("--model", "-m", help=f"checkpoint file (.safetensors/.ckpt) or diffusers folder ({default_help})")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type")
    add_weights_options(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--attention-slicing", action="store_true", help="compute attention in slices to save memory")
    add_engine_options(p)
    p.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        metavar="N",
        help="A1111's clip skip: 1 = the model's own text output (default), N = N - 1 text-encoder layers earlier "
        "(SD1: 2 is the penultimate layer; diffusers' clip_skip=N-1). SD2 counts from its own penultimate layer",
    )
    p.add_argument(
        "--no-prompt-weighting",
        action="store_true",
        help="read prompts literally: no (word:1.3) / [word] emphasis or BREAK (long prompts are still chunked)",
    )
    networks = p.add_argument_group("LoRAs and embeddings (torch engine)")
    networks.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="merge this LoRA (kohya/A1111 or diffusers/PEFT keys) for every image; repeatable",
    )
    networks.add_argument("--lora-dir", help="folder in which a prompt's <lora:NAME:WEIGHT> tags are looked up")
    networks.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH[=WORD]",
        help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds), or a folder of "
        "them; WORD (default: its own token, else its file name) calls it in a prompt; repeatable",
    )
    safety = p.add_argument_group("safety")
    safety.add_argument(
        "--safety-checker",
        metavar="PATH",
        help="run the SD safety checker on every image: a safety_checker folder, a pipeline folder holding one, "
        "or its weights file",
    )
    safety.add_argument(
        "--safety-action",
        choices=SAFETY_ACTIONS,
        default="blackout",
        help="what a flagged image becomes: blackout (diffusers' behaviour, default) or flag (kept, reported)",
    )
    safety.add_argument(
        "--watermark",
        nargs="?",
        const="auto",
        choices=("auto", *WATERMARKS),
        metavar="NAME",
        help="mark every image with the reference scripts' invisible watermark (dwtDct): StableDiffusionV1 or "
        "SDV2 (default: the family's, SDV2 for OpenCLIP-H models, else StableDiffusionV1); images need "
        f"{MIN_SIDE} px on each side; JPEG and resizing erase it. Needs: pip install --no-deps "
        "invisible-watermark==0.2.0 opencv-python-headless PyWavelets",
    )
    limits = p.add_argument_group("limits", "checked before sampling; raise them for a bigger machine")
    for name, help_text in _LIMIT_FLAGS.items():
        default = getattr(Limits(), name)
        limits.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"{help_text} ({default:,})")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """What runs the networks: shared by the generating commands, serve, batch and compile."""
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="torch (default), or openvino: the same networks compiled for the CPU, about 1.4x (f32) to 4x (bf16) "
        "faster per step here; needs the [openvino] extra, converts once into --cache-dir",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="f32",
        help="the OpenVINO engine's arithmetic: f32 (default, within 2/255 of torch) or bf16 where the CPU has it "
        "(faster; images change, see the README)",
    )
    p.add_argument("--cache-dir", help="where converted models are kept (default: ~/.cache/stablekit)")


def add_weights_options(p: argparse.ArgumentParser) -> None:
    """Which weights of a file to load: shared by the generating commands and ``info``."""
    p.add_argument(
        "--vae",
        metavar="PATH",
        help="a separate autoencoder in place of the checkpoint's: an original-layout file "
        "(e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers AutoencoderKL folder",
    )
    p.add_argument(
        "--ema", action="store_true", help="sample with the file's EMA UNet weights (model_ema.*), not its live ones"
    )
    p.add_argument(
        "--variant",
        help="a diffusers folder's weights variant, e.g. fp16 for *.fp16.safetensors (default: the plain files, or "
        "the only variant present)",
    )


def add_sampling_options(p: argparse.ArgumentParser, *, size: bool = True, batch: bool = True) -> None:
    p.add_argument("--negative", "-n", default="", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: the family's)")
    p.add_argument("--guidance", "--cfg", type=float, help="classifier-free guidance scale; on when > 1")
    p.add_argument("--seed", type=int, help="seed; image i of the run uses seed + i (default: random)")
    if size:
        p.add_argument("--width", "-W", type=int, help="multiple of 8 (default: the family's size, or the input's)")
        p.add_argument("--height", "-H", type=int, help="multiple of 8 (default: the family's size, or the input's)")
    if batch:
        p.add_argument("--batch-size", type=int, default=1, help="images per batch")
        p.add_argument("--batch-count", type=int, default=1, help="number of batches")
    p.add_argument("--sampler", help="sampler name, A1111 or diffusers style (see `stablekit samplers`)")
    # Each overrides one setting the sampler otherwise takes from the model's own scheduler config.
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="timestep spacing")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (sigma-space samplers)")
    p.add_argument("--zero-snr", action="store_true", default=None, help="rescale betas to zero terminal SNR")
    p.add_argument(
        "--output", "-o", default="out.png", help="PNG path; with several images, -N is added before the suffix"
    )


def params_from(args: argparse.Namespace, prompt: str) -> GenerationParams:
    options = {
        "eta": args.eta,
        "timestep_spacing": args.spacing,
        "karras": args.karras,
        "rescale_betas_zero_snr": args.zero_snr,
    }
    return GenerationParams(
        prompt=prompt,
        negative_prompt=args.negative,
        width=getattr(args, "width", None),
        height=getattr(args, "height", None),
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=getattr(args, "batch_size", 1),
        batch_count=getattr(args, "batch_count", 1),
        sampler=args.sampler,
        sampler_options={k: v for k, v in options.items() if v is not None},
    )


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png path, got {output!r}")
    if path.is_dir():
        raise ValueError(f"output {output!r} is a folder; give a file name ending in .png")
    # Checked now, not after sampling: the folder is made (as saving would) and a file is created in it.
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
    except OSError as e:
        raise WriteError(f"cannot make the output folder {path.parent}: {e.strerror or e}") from e
    check_writable(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def open_image(path: str, what: str) -> Image.Image:
    return load_image(path, what=what)


def load_pipeline(args: argparse.Namespace, default: Callable[[], Path], what: str) -> Pipeline:
    """The model named by --model, or the packaged demo ``default()``; loading notes printed once."""
    model = args.model
    if model is None:
        model = default()
        print(f"note: no --model given: using the built-in demo {what}", file=sys.stderr)
    pipe = Pipeline.from_file(
        model,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        prediction=args.prediction,
        attention="sliced" if args.attention_slicing else "sdpa",
        limits=Limits(**{name: getattr(args, name) for name in _LIMIT_FLAGS}),
        ema=args.ema,
        vae=args.vae,
        clip_skip=args.clip_skip,
        variant=args.variant,
        engine=args.engine,
        precision=args.precision,
        cache_dir=args.cache_dir,
        report=lambda message: print(f"note: {message}", file=sys.stderr),
        prompt_weighting=not args.no_prompt_weighting,
    )
    for note in pipe.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.lora_dir:
        if not Path(args.lora_dir).is_dir():
            raise ValueError(f"--lora-dir {args.lora_dir}: not a folder")
        pipe.lora_dir = Path(args.lora_dir)
    for option in args.lora:
        add_lora(pipe, *parse_lora_option(option))
    if args.safety_checker:
        pipe.safety_checker = load_safety_checker(args.safety_checker)
        pipe.safety_action = args.safety_action
    if args.watermark:
        pipe.watermark = Watermarker(default_watermark(pipe.config) if args.watermark == "auto" else args.watermark)
    if args.embedding:
        words = add_embedding_files(pipe, args.embedding)
        print(f"note: embeddings loaded, called by: {', '.join(words)}", file=sys.stderr)
    return pipe


Task = Callable[[Pipeline, GenerationParams], Iterator[Event]]


def run_task(args: argparse.Namespace, prompt: str, task: Task, default: Callable[[], Path], what: str) -> int:
    """The common run: check the output path, load the model, drive ``task`` and write its images."""
    params = params_from(args, prompt)
    paths = output_paths(args.output, params.batch_size * params.batch_count)
    pipe = load_pipeline(args, default, what)
    return write_images(task(pipe, params), paths, params.batch_count)


def write_images(events: Iterator[Event], paths: list[Path], batch_count: int) -> int:
    """Drive a task to the end: notices to stderr, a progress bar per batch, each image saved as it comes."""
    written = 0
    bar: tqdm | None = None
    try:
        for ev in events:
            if isinstance(ev, Notice):
                print(f"note: {ev.message}", file=sys.stderr)
            elif isinstance(ev, Progress):
                if bar is None or ev.step == 1:
                    if bar is not None:
                        bar.close()
                    desc = f"batch {ev.batch + 1}/{batch_count}" if batch_count > 1 else "sampling"
                    bar = tqdm(total=ev.total, desc=desc, unit="step", file=sys.stderr)
                bar.update(1)
            elif isinstance(ev, Generated):
                if bar is not None:
                    bar.close()
                    bar = None
                flags = ev.nsfw or [False] * len(ev.images)
                for image, seed, text, flagged in zip(ev.images, ev.seeds, ev.parameters, flags, strict=True):
                    path = save_png(image, paths[written], text)
                    written += 1
                    print(f"{path} (seed {seed})")
                    if flagged:
                        print(f"note: the safety checker flagged {path}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    return 0
