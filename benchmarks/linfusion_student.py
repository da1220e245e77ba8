"""A distilled LinFusion student against its teacher on the shapes bench: same prompts, same seeds, same settings.

Runs the teacher (shapes-sd with softmax self-attention) and the student (the same model with LinFusion's linear
self-attention loaded) on the single- and two-object tasks, prints both success rates, the student's share of the
teacher's accuracy per task, and the mean absolute pixel difference between their images of the same case (0..255).

Run: python benchmarks/linfusion_student.py [--student attncontrol/assets/linfusion/shapes-sd] [--num-seeds 17]
     [--json benchmarks/results/linfusion-shapes-sd-cpu.json]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import save_results
from PIL import Image

from attncontrol import AttentionController
from attncontrol.controls import load_linfusion, unload_linfusion
from attncontrol.models import SHIPPED_LINFUSION, load_pipeline
from attncontrol.shapes.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--student", default=str(SHIPPED_LINFUSION["shapes-sd"]), help="a LinFusion folder")
    parser.add_argument("--num-seeds", type=int, default=17)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    common = {"tasks": ["single", "two"], "num_seeds": args.num_seeds, "num_inference_steps": args.steps}
    with tempfile.TemporaryDirectory() as scratch:
        folders = {"teacher": Path(scratch) / "teacher", "student": Path(scratch) / "student"}
        started = time.perf_counter()
        teacher = run_bench(pipe, model_name="teacher", out_dir=folders["teacher"], **common)
        teacher_seconds = time.perf_counter() - started
        linear = load_linfusion(pipe, args.student)
        try:
            started = time.perf_counter()
            with AttentionController(pipe, [linear]):
                student = run_bench(pipe, model_name="student", out_dir=folders["student"], **common)
            student_seconds = time.perf_counter() - started
        finally:
            unload_linfusion(pipe)
        differences = {}
        for task in common["tasks"]:
            values = []
            for path in sorted((folders["teacher"] / "images" / task).glob("*.png")):
                a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
                b = np.asarray(Image.open(folders["student"] / "images" / task / path.name).convert("RGB"), np.float32)
                values.append(float(np.abs(a - b).mean()))
            differences[task] = float(np.mean(values))

    rows = []
    # report rows follow the task order; their labels are longer than the image folders' task names
    for task, t_row, s_row in zip(common["tasks"], teacher.rows, student.rows, strict=True):
        rows.append(
            {
                "task": t_row.task,
                "teacher": [t_row.successes, t_row.total],
                "student": [s_row.successes, s_row.total],
                "kept": s_row.rate / t_row.rate if t_row.rate else float("nan"),
                "mean_abs_pixel_difference": differences[task],
            }
        )
    lines = [
        f"LinFusion student {args.student} vs teacher {args.model}; {args.num_seeds} seeds, {args.steps} steps; "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads; teacher {teacher_seconds:.0f} s, "
        f"student {student_seconds:.0f} s",
        "",
        "| task | teacher | student | student / teacher | mean abs pixel difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        (ts, tn), (ss, sn) = row["teacher"], row["student"]
        lines.append(
            f"| {row['task']} | {ts}/{tn} ({ts / tn:.1%}) | {ss}/{sn} ({ss / sn:.1%}) | {row['kept']:.1%} | "
            f"{row['mean_abs_pixel_difference']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        record = {"rows": rows, "teacher_seconds": teacher_seconds, "student_seconds": student_seconds}
        save_results(args.json, record, text)


if __name__ == "__main__":
    main()
