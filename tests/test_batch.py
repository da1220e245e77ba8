"""Jobs, batches and run folders: validation that names the field, failures that don't stop a batch, resume, sidecars
that rerun bit-exactly, and the split across two processes under ``accelerate launch`` (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attncontrol.batch import run_batch, saved_jobs
from attncontrol.cli import main
from attncontrol.jobs import Job, JobError, PipelineCache, read_jobs, run_job
from attncontrol.shapes.scenes import ObjectSpec, render

STEPS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A rendered two-object scene, the red square's mask, and a left-half region mask."""
    folder = tmp_path_factory.mktemp("inputs")
    scene = render([ObjectSpec("red", "square", 20, 20, 8), ObjectSpec("blue", "circle", 44, 44, 8)], "white")
    Image.fromarray(scene.image).save(folder / "scene.png")
    Image.fromarray(scene.objects[0].mask.astype(np.uint8) * 255).save(folder / "square.png")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(folder / "left.png")
    return folder


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(job) for job in jobs) + "\n")
    return path


def four_jobs(inputs: Path, bad_mask: str = "missing.png") -> list[dict]:
    return [
        {"prompt": "a red circle", "steps": STEPS, "heatmaps": ["red"]},
        {"kind": "remove", "image": "scene.png", "mask": bad_mask, "steps": STEPS},
        {
            "kind": "regional",
            "prompt": "two shapes",
            "regions": [
                {"prompt": "a red circle", "mask": "left.png"},
                {"prompt": "a blue square", "box": [0.5, 0, 1, 1]},
            ],
            "steps": STEPS,
        },
        {"kind": "move", "image": "scene.png", "mask": "square.png", "offset": [12, 0], "steps": STEPS},
    ]


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prompt": "x", "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"kind": "paint", "prompt": "x"}, "`kind` must be one of"),
        ({"kind": "generate"}, "a 'generate' job needs `prompt`"),
        ({"prompt": "x", "offset": [1, 2]}, r"`offset` is read by \['move'\] jobs, not by 'generate'"),
        ({"prompt": "x", "steps": 0}, "`steps` must be >= 1"),
        ({"prompt": "x", "seed": "1"}, "`seed` must be int"),
        ({"kind": "move", "image": "a.png", "mask": "b.png"}, "exactly one of `offset`"),
        ({"kind": "move", "image": "a.png", "mask": "b.png", "offset": [1]}, "`offset` must be 2 numbers"),
        ({"kind": "regional", "regions": [{"prompt": "x"}]}, r"regions\[0\]` needs exactly one of `mask`"),
        ({"kind": "regional", "regions": [{"mask": "m.png"}]}, r"regions\[0\]` needs exactly one of `prompt`"),
        ({"kind": "regional", "regions": [{"prompt": "x", "box": [0, 0, 1, 1], "colour": 1}]}, "unknown key"),
        ({"prompt": "x", "heatmaps": "red"}, "`heatmaps` must be a list"),
    ],
)
def test_bad_fields_are_named(raw, message):
    with pytest.raises(JobError, match=message):
        Job.from_dict(raw, where="jobs.jsonl line 7")
    with pytest.raises(JobError, match=r"jobs\.jsonl line 7"):
        Job.from_dict(raw, where="jobs.jsonl line 7")


def test_job_files_resolve_paths_apply_defaults_and_seeds(tmp_path, inputs):
    (tmp_path / "jobs.yaml").write_text(
        "defaults: {steps: 4, model: shapes-sd}\n"
        "jobs:\n"
        f"  - {{kind: remove, image: {inputs}/scene.png, mask: square.png}}\n"
        "  - {prompt: a red circle, steps: 2}\n"
    )
    jobs = read_jobs(tmp_path / "jobs.yaml", seeds=[3, 5])
    assert [(job.kind, job.seed, job.steps) for job in jobs] == [
        ("remove", 3, 4),
        ("remove", 5, 4),
        ("generate", 3, 2),
        ("generate", 5, 2),
    ]
    assert jobs[0].image == str(inputs / "scene.png")
    assert jobs[0].mask == str(tmp_path / "square.png")  # relative to the job file's folder
    write_jobs(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "x", "stepz": 2}])
    with pytest.raises(JobError, match=r"bad.jsonl line 2: unknown field\(s\) \['stepz'\]"):
        read_jobs(tmp_path / "bad.jsonl")


def test_round_trip_through_a_dict_keeps_the_job(inputs):
    job = Job.from_dict(four_jobs(inputs)[2], base_dir=inputs)
    assert Job.from_dict(job.to_dict()) == job
    assert "negative_prompt" not in job.to_dict()  # defaults stay out of sidecars


def test_dry_run_opens_every_input_and_runs_nothing(tmp_path, inputs, caplog):
    jobs = write_jobs(inputs / "dry.jsonl", four_jobs(inputs))
    out = tmp_path / "run"
    assert main(["batch", str(jobs), "--dry-run", "--out", str(out)]) == 1
    assert "job 0001" in caplog.text and "missing.png" in caplog.text
    assert not out.exists()
    fixed = write_jobs(inputs / "dry-ok.jsonl", four_jobs(inputs, bad_mask="square.png"))
    assert main(["batch", str(fixed), "--dry-run", "--out", str(out)]) == 0
    assert not out.exists()


def test_wrong_sized_mask_is_caught_before_the_run(tmp_path, inputs):
    Image.new("L", (40, 64), 255).save(tmp_path / "wide.png")
    job = Job.from_dict({"kind": "remove", "image": str(inputs / "scene.png"), "mask": str(tmp_path / "wide.png")})
    with pytest.raises(JobError, match="mask"):
        job.check_inputs()


# ------------------------------------------------------------------------------------------------ batches
def test_failing_job_is_reported_the_rest_finish_and_resume_completes_the_gap(tmp_path, inputs, caplog):
    jobs = write_jobs(inputs / "batch.jsonl", four_jobs(inputs))
    run = tmp_path / "run"
    assert main(["batch", str(jobs), "--out", str(run)]) == 1  # one job failed
    assert "job 0001" in caplog.text and "missing.png" in caplog.text
    manifest = json.loads((run / "manifest.json").read_text())
    assert [entry["status"] for entry in manifest["jobs"]] == ["done", "failed", "done", "done"]
    assert "missing.png" in manifest["jobs"][1]["error"]
    for stem in ("0000", "0002", "0003"):
        assert (run / f"{stem}.png").exists() and (run / f"{stem}.json").exists()
    assert (run / "0000_heatmap_red.png").exists()
    assert json.loads((run / "0001.error.json").read_text())["job"]["mask"].endswith("missing.png")
    before = {stem: (run / f"{stem}.png").stat().st_mtime_ns for stem in ("0000", "0002", "0003")}

    # The same folder again without --resume is refused: nothing is overwritten by accident.
    assert main(["batch", str(jobs), "--out", str(run)]) == 1
    assert "--resume" in caplog.text

    Image.open(inputs / "square.png").save(inputs / "missing.png")  # the user fixes the missing file
    try:
        assert main(["batch", "--resume", str(run)]) == 0  # the job file is not needed to resume
    finally:
        (inputs / "missing.png").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["done"] == 4 and manifest["failed"] == 0
    assert not (run / "0001.error.json").exists()
    assert {stem: (run / f"{stem}.png").stat().st_mtime_ns for stem in before} == before  # only the gap ran
    assert len(saved_jobs(run)) == 4


def test_resume_refuses_different_jobs(tmp_path, inputs):
    run = tmp_path / "run"
    jobs = [Job.from_dict({"prompt": "a red circle", "steps": 1})]
    run_batch(jobs, run, progress=False)
    with pytest.raises(JobError, match="jobs differ"):
        run_batch([Job.from_dict({"prompt": "a blue circle", "steps": 1})], run, resume=True, progress=False)


@pytest.mark.parametrize("index", [0, 2, 3])
def test_sidecar_reruns_to_the_same_pixels(tmp_path, inputs, index):
    """Each kind's sidecar, run again in a new run folder, gives the image bit for bit (same machine and threads)."""
    job = Job.from_dict(four_jobs(inputs)[index], base_dir=inputs)
    first = tmp_path / "first"
    run_batch([job], first, progress=False)
    sidecar = json.loads((first / "0000.json").read_text())
    assert sidecar["job"]["seed"] == 0 and sidecar["job"]["model"] == "shapes-sd" and sidecar["versions"]["torch"]
    again = tmp_path / "again"
    assert main(["batch", str(first / "0000.json"), "--out", str(again)]) == 0
    assert np.array_equal(pixels(first / "0000.png"), pixels(again / "0000.png"))
    if job.kind == "move":
        return  # an edit starts from the image's inversion, not from noise: the seed does not enter
    other_seed = tmp_path / "seed1"
    assert main(["batch", str(first / "0000.json"), "--seeds", "1", "--out", str(other_seed)]) == 0
    assert not np.array_equal(pixels(first / "0000.png"), pixels(other_seed / "0000.png"))


def test_regional_job_is_the_regional_pipeline_call(inputs):
    """A job's mask-file and box regions reach the regional pipeline as the same Regions a script would pass."""
    from attncontrol.controls.regions import Region
    from attncontrol.pipelines import to_regional

    raw = four_jobs(inputs)[2]
    cache = PipelineCache()
    image = np.asarray(run_job(Job.from_dict(raw, base_dir=inputs), cache).image)
    regions = [
        Region(mask=Image.open(inputs / "left.png"), prompt="a red circle"),
        Region.box((0.5, 0, 1, 1), prompt="a blue square"),
    ]
    direct = to_regional(cache.get(None))(
        "two shapes",
        regions=regions,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert np.array_equal(image, np.asarray(direct))
    plain = run_job(Job.from_dict({"prompt": "two shapes", "steps": STEPS}), cache).image
    assert not np.array_equal(image, np.asarray(plain))  # the regions did something


def test_generate_command_builds_edit_jobs_from_arguments(tmp_path, inputs):
    out = tmp_path / "moved.png"
    args = ["generate", "--image", str(inputs / "scene.png"), "--mask", str(inputs / "square.png")]
    assert main([*args, "--offset", "20", "0", "--steps", str(STEPS), "-o", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["job"]["kind"] == "move" and sidecar["job"]["offset"] == [20.0, 0.0]
    assert main([*args, "--steps", str(STEPS), "-o", str(tmp_path / "removed.png")]) == 0
    assert json.loads((tmp_path / "removed.json").read_text())["job"]["kind"] == "remove"
    region = ["--region", f"a red circle@{inputs / 'left.png'}", "--region", "a blue circle@0.5,0,1,1"]
    assert main(["generate", "two shapes", *region, "--steps", "2", "-o", str(tmp_path / "r.png")]) == 0
    regions = json.loads((tmp_path / "r.json").read_text())["job"]["regions"]
    assert regions[1] == {"prompt": "a blue circle", "box": [0.5, 0.0, 1.0, 1.0]}


def test_two_processes_split_the_jobs(tmp_path, inputs):
    """``accelerate launch`` with 2 CPU processes (gloo): every job runs once, on alternating processes."""
    jobs = write_jobs(
        inputs / "split.jsonl", [{"prompt": f"a {c} circle", "steps": 2} for c in ("red", "blue", "green")]
    )
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # with --device cpu each process runs on the CPU and talks over gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "attncontrol",
        "batch",
        str(jobs),
        "--out",
        str(run),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["done"] == 3
    processes = [json.loads((run / f"{i:04d}.json").read_text())["process"] for i in range(3)]
    assert processes == [0, 1, 0]
