"""``attncontrol`` command line: generate with attention controls and save images, maps and settings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from attncontrol import __version__
from attncontrol.batch import save_result
from attncontrol.jobs import JOB_KINDS, Job, JobError, PipelineCache, read_jobs, run_job
from attncontrol.models import available_models, default_model, load_pipeline

logger = logging.getLogger("attncontrol.cli")


def _region(text: str) -> dict[str, Any]:
    """``--region "a red circle@0,0,0.5,1"`` (a box) or ``"a red circle@mask.png"``: a region's own prompt, where."""
    prompt, sep, where = text.rpartition("@")
    if not sep or not prompt.strip() or not where:
        raise JobError(f"--region must be PROMPT@x0,y0,x1,y1 or PROMPT@MASK_FILE, got {text!r}")
    try:
        box = [float(v) for v in where.split(",")]
    except ValueError:
        return {"prompt": prompt, "mask": where}
    return {"prompt": prompt, "box": box}


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise JobError(f"--option must be KEY=VALUE (VALUE as JSON, or a plain string), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def job_from_args(args: argparse.Namespace) -> Job:
    """One job from ``generate``'s arguments; the kind follows from what is given unless ``--kind`` says it."""
    kind = args.kind
    if kind is None:
        if args.reference_image:
            kind = "compose"
        elif args.image and (args.offset or args.target_box):
            kind = "move"
        elif args.image:
            kind = "remove"
        else:
            kind = "regional" if args.region else "generate"
    raw: dict[str, Any] = {
        "kind": kind,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "regions": [_region(text) for text in args.region] or None,
        "region_mode": args.region_mode,
        "image": args.image,
        "mask": args.mask,
        "offset": args.offset,
        "target_box": args.target_box,
        "reference_image": args.reference_image,
        "reference_mask": args.reference_mask,
        "box": args.box,
        "heatmaps": args.heatmap or None,
        "concepts": args.concepts,
        "options": dict(_option(text) for text in args.option) or None,
    }
    return Job.from_dict({k: v for k, v in raw.items() if v is not None}, base_dir=Path.cwd(), where="arguments")


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one job from the arguments; write the image, heat maps and a sidecar that reruns it (``batch SIDECAR``)."""
    job = job_from_args(args)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise JobError(f"-o/--output must name a .png file, got {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run_job(job, PipelineCache(device=args.device))
    written = save_result(output.parent, output.stem, job, result, time.perf_counter() - start, args.device)
    return written


def batch(args: argparse.Namespace) -> list[Path]:
    """Run a job file into a run folder (see :mod:`attncontrol.batch`)."""
    from attncontrol.batch import new_run_dir, run_batch, saved_jobs, validate
    from attncontrol.training.common import finish_processes

    if args.jobs is None and args.resume is None:
        raise JobError("give a job file (JSONL, JSON, YAML or a sidecar), or --resume RUN_FOLDER")
    jobs = read_jobs(args.jobs, seeds=args.seeds) if args.jobs is not None else saved_jobs(args.resume)
    if args.model:
        jobs = [dataclasses.replace(job, model=args.model) for job in jobs]
    errors = validate(jobs)
    for message in errors.values():
        logger.error("%s", message)
    if args.dry_run:
        print(f"{len(jobs) - len(errors)} of {len(jobs)} jobs are valid")
        if errors:
            raise JobError(f"{len(errors)} job(s) are invalid (see above)")
        return []
    run_dir = Path(args.resume or args.out or new_run_dir())
    report = run_batch(jobs, run_dir, device=args.device, resume=args.resume is not None)
    finish_processes()
    print(
        f"{run_dir}: {len(report.done)} done, {len(report.skipped)} already done, {len(report.failed)} failed "
        f"(manifest: {run_dir / 'manifest.json'})"
    )
    if report.failed:
        failures = "; ".join(f"job {index:04d}: {message}" for index, message in sorted(report.failed.items()))
        raise JobError(f"{len(report.failed)} job(s) failed: {failures}")
    return [run_dir / "manifest.json"]


def bench(args: argparse.Namespace) -> list[Path]:
    """Score a model on the shapes world; print the markdown table and save images + JSON."""
    from attncontrol.shapes.bench import run_bench

    pipe = load_pipeline(args.model, device=args.device)
    extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    report = run_bench(
        pipe,
        model_name=args.model or default_model(),
        tasks=args.task or ["single", "two"],
        num_seeds=args.num_seeds,
        seed_offset=args.seed_offset,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        out_dir=args.out,
        extra_call_kwargs=extra,
    )
    print(report.markdown())
    return [Path(args.out) / "report.md", Path(args.out) / "report.json"]


def edit_bench(args: argparse.Namespace) -> list[Path]:
    """Score removal, moves, drags and compositions on real (rendered, inverted) shapes scenes; print the table,
    save images + JSON."""
    from attncontrol.shapes.edit_bench import EDIT_TASKS, run_edit_bench

    pipe = load_pipeline(args.model, device=args.device)
    report = run_edit_bench(
        pipe,
        model_name=args.model or default_model(),
        tasks=args.task or list(EDIT_TASKS),
        methods=args.method,
        num_cases=args.num_cases,
        num_inference_steps=args.steps,
        out_dir=args.out,
    )
    print(report.markdown())
    return [Path(args.out) / "report.md", Path(args.out) / "report.json"]


def app(args: argparse.Namespace) -> list[Path]:
    """Serve the Gradio editing app until interrupted."""
    from attncontrol.app import launch

    launch(
        host=args.host,
        port=args.port,
        share=args.share,
        model=args.model,
        device=args.device,
        output_dir=args.outputs,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
    )
    return []


DEVICE_HELP = "torch device: cpu, cuda, cuda:1, mps (default: cpu)"


def _box_argument(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    parser.add_argument(flag, type=float, nargs=4, default=None, metavar=("X0", "Y0", "X1", "Y1"), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncontrol", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attncontrol {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="one generation or edit from arguments: image, heat maps and a sidecar that reruns it",
        description="Generate (with --region: regional prompts) or edit a real image (--image with --mask: remove; "
        "plus --offset/--target-box: move; --reference-image/--reference-mask/--box: compose).",
    )
    gen.add_argument("prompt", nargs="?", default="", help="text prompt (edits may leave it empty)")
    gen.add_argument(
        "--model",
        default=None,
        help=f"a name ({', '.join(available_models())}), a local diffusers folder or a hub id "
        f"(default: {default_model()})",
    )
    gen.add_argument("--kind", choices=JOB_KINDS, default=None, help="default: from the arguments given")
    gen.add_argument("--negative-prompt", default=None, help="what classifier-free guidance steers away from")
    gen.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: 20; edits 50)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: 7.5; edits 1.0")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's own size)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's own size)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    gen.add_argument(
        "--heatmap",
        action="append",
        default=[],
        metavar="WORD",
        help="save a cross-attention heat map of WORD (repeatable)",
    )
    gen.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="PROMPT@WHERE",
        help="a region with its own prompt; WHERE is x0,y0,x1,y1 (relative when all <= 1) or a mask file (repeatable)",
    )
    gen.add_argument(
        "--region-mode",
        choices=("hard", "soft"),
        default=None,
        help="hard: a region's words are seen only inside it; soft: DenseDiffusion's logit boosts (default: hard)",
    )
    gen.add_argument(
        "--concepts",
        default=None,
        metavar="RUN_FOLDER",
        help="tokens learned by `python -m attncontrol.training.concepts` (the prompt may use them, e.g. <asset0>)",
    )
    gen.add_argument("--image", default=None, help="the real image to edit")
    gen.add_argument("--mask", default=None, help="the object to remove or move, the image's size")
    gen.add_argument("--offset", type=float, nargs=2, default=None, metavar=("DX", "DY"), help="move by pixels")
    _box_argument(gen, "--target-box", "move: where the object goes, in pixels (instead of --offset)")
    gen.add_argument("--reference-image", default=None, help="compose: the image holding the object")
    gen.add_argument("--reference-mask", default=None, help="compose: the object in the reference image")
    _box_argument(gen, "--box", "compose: where the reference object goes in --image, in pixels")
    gen.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further pipeline argument, VALUE as JSON (e.g. dilation=3) (repeatable)",
    )
    gen.add_argument("--device", default="cpu", help=DEVICE_HELP)
    gen.add_argument("-o", "--output", default="outputs/attncontrol.png", help="image path; maps and JSON go beside it")
    gen.set_defaults(func=generate)

    batch_parser = commands.add_parser(
        "batch",
        help="run a file of jobs into a run folder (NNNN.png + NNNN.json sidecars, manifest.json)",
        description="Jobs come from JSONL (one per line), JSON or YAML (a list, or {defaults: ..., jobs: [...]}), or "
        "a sidecar. A failing job is reported and the rest run; --resume finishes a run folder. Under "
        "`accelerate launch --num_processes N` the jobs are split across the processes.",
    )
    batch_parser.add_argument("jobs", nargs="?", default=None, help="job file (.jsonl, .json, .yaml) or a sidecar")
    batch_parser.add_argument("--out", default=None, help="run folder (default: outputs/runs/<date>-<time>)")
    batch_parser.add_argument("--resume", default=None, metavar="RUN_FOLDER", help="run only the unfinished jobs")
    batch_parser.add_argument("--dry-run", action="store_true", help="check every job and its files; run nothing")
    batch_parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run every job once per seed")
    batch_parser.add_argument("--model", default=None, help="run every job on this model")
    batch_parser.add_argument("--device", default="cpu", help="under accelerate launch: each process's own device")
    batch_parser.set_defaults(func=batch)

    bench_parser = commands.add_parser("bench", help="score a model on the shapes-world prompt suite")
    bench_parser.add_argument("--model", default=None, help=f"as for generate (default: {default_model()})")
    bench_parser.add_argument(
        "--task",
        action="append",
        default=None,
        help="single, two, layout, layout-baseline, placement or placement-baseline (repeatable; default: single "
        "and two)",
    )
    bench_parser.add_argument("--num-seeds", type=int, default=17, help="seeds per prompt (default: 17)")
    bench_parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="add this to every seed: choose settings on held-out seeds, report on the default ones (default: 0)",
    )
    bench_parser.add_argument("--steps", type=int, default=25, help="sampling steps per image (default: 25)")
    bench_parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (default: 5.0)")
    bench_parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default: 16)")
    bench_parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 length for Flux/SD3 models")
    bench_parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    bench_parser.add_argument("--out", default="outputs/bench", help="folder for images, report.json and report.md")
    bench_parser.set_defaults(func=bench)

    edit_parser = commands.add_parser(
        "edit-bench", help="score removal, moves, drags and compositions against their baselines on shapes scenes"
    )
    edit_parser.add_argument("--model", default=None, help=f"an SD-family model as for generate ({default_model()})")
    edit_parser.add_argument(
        "--task", action="append", default=None, help="remove, move, drag or compose (repeatable; default: all four)"
    )
    edit_parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="remove/move: designedit, designedit-inverted, inpaint-fill, inpaint, or the ablation inverted-key-zero, "
        "inverted-query, inverted-value; drag: drag, drag-unshared, drag-free-late, drag-free-late-masked, "
        "drag-free-late-unshared; compose: compose, compose-steered, compose-early-release, "
        "compose-early-release-unsteered, compose-early-release-shared; drag and compose: cut-paste-sdedit, regenerate "
        "(default: each task's own list)",
    )
    edit_parser.add_argument("--num-cases", type=int, default=100, help="cases per task (default: 100)")
    edit_parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50, as DesignEdit)")
    edit_parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    edit_parser.add_argument("--out", default="outputs/edit-bench", help="folder for images, report.json, report.md")
    edit_parser.set_defaults(func=edit_bench)
    app_parser = commands.add_parser("app", help="the Gradio editing app (needs `pip install attncontrol[app]`)")
    app_parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve your network (default: local only)")
    app_parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    app_parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    app_parser.add_argument("--model", default=None, help=f"the model picked at start (default: {default_model()})")
    app_parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    app_parser.add_argument("--outputs", default=None, help="where results and sidecars go (default: outputs/app/DAY)")
    app_parser.add_argument("--concurrency", type=int, default=1, help="requests run at once; the rest queue")
    app_parser.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones are refused")
    app_parser.set_defaults(func=app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = args.func(args)
    except Exception as error:  # a CLI reports, it does not dump a traceback for a bad argument
        if args.verbose:
            raise
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
