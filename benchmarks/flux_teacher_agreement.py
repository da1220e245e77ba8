"""How close is a distilled Flux shapes student to its SD teacher? Per flow time, on the same noisy latents.

For single-object scenes of the shapes world (with their own captions) noised to flow time t, per t:
- the student's velocity error against the teacher's (what ``--teacher`` training minimises);
- the clean-latent error of each, ``x0 = x_t - t v`` against the scene's true latent;
- the cosine between the student's and the teacher's guidance directions (conditional minus unconditional
  velocity): true CFG amplifies that direction, so a student whose direction points elsewhere draws nothing even
  when its loss is low (the 2026-12-06 attempts: cosine ~0.2 and blank samples), and the ratio of their sizes.

A guidance-distilled student (``--guidance-min/--guidance-max``, a guidance embedding) is compared with the
teacher's guided velocity at ``--guidance-scale``; its guidance direction is its prompted minus its empty-prompt
velocity at that scale, against the teacher's guided minus unconditional one.

``--teacher-samples N`` also samples the teacher's own field the way a student samples (Euler from t = 1, guided at
``--guidance-scale``) for the 12 single-object prompts x N seeds and scores the images with the detector: whether
the targets a student learns can draw the prompts at all. ``--student-samples N`` samples the student the same way
(the same prompts and noises) and ``--grid`` saves its images; for a reflow student (``--reflow-pairs``) the grid
also shows its samples from its first 12 training pairs' noises above the teacher's.

The student is an exported FluxPipeline folder or a training checkpoint (``checkpoint-flux.pt`` beside its run's
``config.json``; its EMA weights are read).

Run: python benchmarks/flux_teacher_agreement.py --student runs/shapes-flux/checkpoint-flux.pt [--teacher shapes-sd]
     [--scenes 16] [--guidance-scale 5] [--teacher-samples 1] [--student-samples 2 --grid samples.png]
     [--json benchmarks/results/flux-teacher-agreement-cpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _results import save_results
from PIL import Image

from attncontrol.shapes import detect
from attncontrol.shapes.bench import objects_present, single_object_cases
from attncontrol.shapes.scenes import to_pixels
from attncontrol.training import shapes_flux
from attncontrol.training.flow_teacher import FlowTeacher
from attncontrol.training.shapes_vae import encode_pool

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99)


def load_student(path: Path, teacher: FlowTeacher):
    """(transformer, clip, t5, clip tokenizer, t5 tokenizer) of an exported pipeline or a training checkpoint."""
    if path.suffix == ".pt":
        fields = json.loads((path.parent / "config.json").read_text())
        known = shapes_flux.Config.__dataclass_fields__
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
        config = shapes_flux.Config(**values)
        clip, t5, clip_tok, t5_tok = shapes_flux.build_text_encoders(config, teacher if config.teacher else None)
        transformer = shapes_flux.build_transformer(config, teacher.vae.config.latent_channels)
        state = torch.load(path, weights_only=False, map_location="cpu")
        for module, saved in zip((transformer, clip, t5), state["emas"], strict=True):
            module.load_state_dict(saved)
        return transformer, clip, t5, clip_tok, t5_tok
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
    return pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2


@torch.no_grad()
def agreement(student, teacher: FlowTeacher, scenes: int, seed: int = 0, guidance_scale: float = 5.0) -> list[dict]:
    transformer, clip, t5, clip_tok, t5_tok = student
    guided = bool(transformer.config.guidance_embeds)
    guidance = torch.full((scenes,), guidance_scale) if guided else None
    for module in (transformer, clip, t5):
        module.float().eval()
    latents, captions, _ = encode_pool(teacher.vae, scenes, seed + 99, (1, 0, 0))
    x0 = latents * teacher.scaling_factor
    grid = x0.shape[-1] // 2
    cond = shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, captions, "cpu")
    uncond = shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, [""] * scenes, "cpu")
    image_ids = shapes_flux.image_ids(grid, grid)
    text_ids = torch.zeros(t5_tok.model_max_length, 3)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for time in TIMES:
        t = torch.full((scenes,), time)
        noisy = (1 - time) * x0 + time * torch.randn(x0.shape, generator=generator)
        packed = shapes_flux.pack(noisy)
        student_cond, student_uncond = (
            shapes_flux.predict_velocity(transformer, packed, t, text, text_ids, image_ids, guidance)
            for text in (cond, uncond)
        )
        teacher_time, scale = t.clamp(max=0.999), guidance_scale if guided else 1.0
        teacher_cond = shapes_flux.pack(teacher.velocity(noisy, teacher_time, captions, guidance_scale=scale)[0])
        teacher_uncond = shapes_flux.pack(teacher.velocity(noisy, teacher_time, [""] * scenes)[0])
        truth = shapes_flux.pack(x0)
        student_direction = (student_cond - student_uncond).flatten(1)
        teacher_direction = (teacher_cond - teacher_uncond).flatten(1)
        cosine = F.cosine_similarity(student_direction, teacher_direction).mean()
        size_ratio = (student_direction.norm(dim=1) / teacher_direction.norm(dim=1)).mean()
        rows.append({
            "t": time,
            "velocity_error": float((student_cond - teacher_cond).pow(2).mean()),
            "student_x0_error": float((packed - time * student_cond - truth).pow(2).mean()),
            "teacher_x0_error": float((packed - time * teacher_cond - truth).pow(2).mean()),
            "guidance_cosine": float(cosine),
            "guidance_size_ratio": float(size_ratio),
        })  # fmt: skip
    return rows


@torch.no_grad()
def teacher_flow_samples(teacher: FlowTeacher, num_seeds: int, guidance_scale: float, steps: int = 20) -> dict:
    """Detector hits of the teacher's guided velocity field integrated with Euler from t = 1 to 0."""
    cases = single_object_cases(num_seeds, seed_offset=500)
    shape = (teacher.vae.config.latent_channels, 32, 32)  # 64x64 scenes, factor-2 autoencoder
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(case.seed)) for case in cases])
    latents = teacher.sample(latents, [case.prompt for case in cases], guidance_scale, steps)
    images = to_pixels(teacher.vae.decode(latents / teacher.scaling_factor).sample)
    hits = sum(objects_present(detect(image), case.expected) for case, image in zip(cases, images, strict=True))
    return {"hits": int(hits), "total": len(cases), "steps": steps, "guidance_scale": guidance_scale}


@torch.no_grad()
def student_sample(student, noise: torch.Tensor, prompts: list[str], guidance_scale: float, steps: int = 20):
    """The student's clean latents from ``noise`` (unpacked, the teacher's latent frame): Euler from t = 1 to 0, as
    the teacher's check samples; a guidance-distilled student reads the scale, an unguided one takes true CFG."""
    transformer, clip, t5, clip_tok, t5_tok = student
    guided = bool(transformer.config.guidance_embeds)
    grid = noise.shape[-1] // 2
    image_ids, text_ids = shapes_flux.image_ids(grid, grid), torch.zeros(t5_tok.model_max_length, 3)
    cond = shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, prompts, "cpu")
    uncond = None if guided else shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, [""] * len(prompts), "cpu")
    guidance = torch.full((len(prompts),), guidance_scale) if guided else None
    latents = shapes_flux.pack(noise)
    for now, after in itertools.pairwise(torch.linspace(1.0, 0.0, steps + 1)):
        t = now.expand(len(prompts))
        velocity = shapes_flux.predict_velocity(transformer, latents, t, cond, text_ids, image_ids, guidance)
        if uncond is not None:
            empty = shapes_flux.predict_velocity(transformer, latents, t, uncond, text_ids, image_ids)
            velocity = empty + guidance_scale * (velocity - empty)
        latents = latents + (after - now) * velocity
    return shapes_flux.unpack(latents, grid)


@torch.no_grad()
def student_flow_samples(student, teacher: FlowTeacher, num_seeds: int, guidance_scale: float, steps: int = 20):
    """Detector hits of the student sampled like the teacher's check (the same prompts and noises), and the images."""
    cases = single_object_cases(num_seeds, seed_offset=500)
    shape = (teacher.vae.config.latent_channels, 32, 32)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(case.seed)) for case in cases])
    latents = student_sample(student, noise, [case.prompt for case in cases], guidance_scale, steps)
    images = to_pixels(teacher.vae.decode(latents / teacher.scaling_factor).sample)
    hits = sum(objects_present(detect(image), case.expected) for case, image in zip(cases, images, strict=True))
    summary = {"hits": int(hits), "total": len(cases), "steps": steps, "guidance_scale": guidance_scale}
    return summary, images


@torch.no_grad()
def pair_rows(student, teacher: FlowTeacher, pairs_path: Path, count: int, guidance_scale: float) -> list:
    """For a reflow student: its samples from the first ``count`` training pairs' noises, and the teacher's."""
    pairs = torch.load(pairs_path, weights_only=False)
    noise, captions = pairs["noise"][:count], pairs["captions"][:count]
    mine = student_sample(student, noise, captions, guidance_scale)
    decode = teacher.vae.decode
    return [to_pixels(decode(x / teacher.scaling_factor).sample) for x in (mine, pairs["sample"][:count])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="exported FluxPipeline folder or checkpoint-flux.pt")
    parser.add_argument("--teacher", default="shapes-sd")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="for guidance-distilled students")
    parser.add_argument("--teacher-samples", type=int, default=0, help="seeds per prompt of the teacher-as-flow check")
    parser.add_argument("--student-samples", type=int, default=0, help="seeds per prompt of the same check, student")
    parser.add_argument(
        "--grid", default=None, help="PNG of the student's samples (rows of 12; a reflow student's pairs below)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    teacher = FlowTeacher.from_pretrained(args.teacher)
    student = load_student(Path(args.student), teacher)
    guided = bool(student[0].config.guidance_embeds)
    rows = agreement(student, teacher, args.scenes, guidance_scale=args.guidance_scale)
    against = f"guided at {args.guidance_scale}" if guided else "unguided"
    lines = [
        f"Student `{args.student}` against teacher `{args.teacher}` ({against}), {args.scenes} single-object scenes",
        "",
        "| t | velocity error | student x0 error | teacher x0 error | guidance cosine | guidance size ratio |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['t']} | {r['velocity_error']:.4f} | {r['student_x0_error']:.4f} | {r['teacher_x0_error']:.4f} "
            f"| {r['guidance_cosine']:.3f} | {r['guidance_size_ratio']:.2f} |"
            for r in rows
        ),
    ]
    sampled = None
    if args.teacher_samples:
        sampled = teacher_flow_samples(teacher, args.teacher_samples, args.guidance_scale)
        lines += [
            "",
            f"The teacher's guided field sampled as a flow model (Euler, {sampled['steps']} steps from t = 1, guidance "
            f"{args.guidance_scale}): {sampled['hits']}/{sampled['total']} single-object prompts drawn right.",
        ]
    student_sampled = None
    if args.student_samples:
        student_sampled, images = student_flow_samples(student, teacher, args.student_samples, args.guidance_scale)
        lines += [
            "",
            f"The student sampled the same way (the same prompts and noises): {student_sampled['hits']}/"
            f"{student_sampled['total']} single-object prompts drawn right.",
        ]
        if args.grid:
            strips = [images[i : i + 12] for i in range(0, len(images) - len(images) % 12, 12)]
            pairs_path = Path(args.student).parent / "reflow-pairs.pt"
            if pairs_path.exists():
                strips += pair_rows(student, teacher, pairs_path, 12, args.guidance_scale)
            blank = np.full_like(images[0], 255)  # pads a short row (a run with fewer than 12 pairs)
            strips = [list(strip) + [blank] * (12 - len(strip)) for strip in strips]
            Image.fromarray(np.concatenate([np.concatenate(strip, axis=1) for strip in strips])).save(args.grid)
    table = "\n".join(lines)
    print(table)
    if args.json:
        device = f"CPU ({platform.machine()}), torch {torch.__version__}"
        record = {"device": device, "student": args.student, "teacher": args.teacher, "rows": rows}
        if sampled is not None:
            record["teacher_flow_samples"] = sampled
        if student_sampled is not None:
            record["student_flow_samples"] = student_sampled
        save_results(args.json, record, table)


if __name__ == "__main__":
    main()
