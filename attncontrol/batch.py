"""Batches of jobs into a run folder: ``NNNN.png`` + ``NNNN.json`` sidecar per job, a manifest, resume, and jobs split
across processes under ``accelerate launch`` (or ``torchrun``).

Nothing is lost on a crash: each job's files are written when it finishes, a failed job leaves ``NNNN.error.json``
and the batch goes on, and ``--resume`` runs only the jobs without a sidecar.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attncontrol.jobs import Job, JobError, PipelineCache, run_job

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
MANIFEST_FILE = "manifest.json"


def slug(text: str) -> str:
    """A file-name-safe form of a word ("blue square" -> "blue-square")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "token"


def versions() -> dict[str, str]:
    """Versions that decide the pixels; a sidecar records them so a rerun on other versions can be recognized."""
    import diffusers
    import transformers

    from attncontrol import __version__

    return {
        "attncontrol": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def new_run_dir(root: str | Path = "outputs/runs") -> Path:
    """``root/<date>-<time>``, with a counter when two runs start in the same second."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    path = root / stamp
    counter = 1
    while path.exists():
        path = root / f"{stamp}-{counter}"
        counter += 1
    return path


@dataclass
class BatchReport:
    run_dir: Path
    done: list[int]
    failed: dict[int, str]
    skipped: list[int]

    @property
    def ok(self) -> bool:
        return not self.failed


def _stem(index: int) -> str:
    return f"{index:04d}"


def save_result(
    folder: Path,
    stem: str,
    job: Job,
    result: Any,
    seconds: float,
    device: str,
    index: int | None = None,
    process: int = 0,
) -> list[Path]:
    """``stem.png``, its heat maps and the ``stem.json`` sidecar; the sidecar goes last, so its presence means the
    job is complete. The sidecar's ``job`` runs again to the same pixels (``attncontrol batch stem.json``)."""
    run_dir = folder
    image_path = run_dir / f"{stem}.png"
    result.image.save(image_path)
    written = [image_path]
    for word, heat in result.heatmaps.items():
        heat_path = run_dir / f"{stem}_heatmap_{slug(word)}.png"
        heat.save(heat_path)
        written.append(heat_path)
    sidecar = {
        "job": job.resolved().to_dict(),
        **({"index": index} if index is not None else {}),
        "outputs": [path.name for path in written],
        "size": [result.image.height, result.image.width],
        "seconds": round(seconds, 3),
        "device": device,
        "process": process,
        # CPU float sums depend on the thread count: a bit-exact rerun needs the same versions, device and threads
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    sidecar_path = run_dir / f"{stem}.json"
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    (run_dir / f"{stem}.error.json").unlink(missing_ok=True)
    return [*written, sidecar_path]


def run_batch(
    jobs: list[Job],
    run_dir: str | Path,
    *,
    device: str = "cpu",
    pipelines: PipelineCache | None = None,
    resume: bool = False,
    progress: bool = True,
) -> BatchReport:
    """Run ``jobs`` into ``run_dir``; under several processes each takes every n-th job.

    ``resume`` keeps what is there and runs the jobs without a sidecar; without it the folder must be new or empty,
    so an old run is never overwritten by accident. ``device`` "cuda" means each process's own GPU; "cpu" runs
    every process on the CPU (gloo), which is how the split is tested.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    run_dir = Path(run_dir)
    jobs_path = run_dir / JOBS_FILE
    if state.is_main_process:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            raise JobError(f"run folder {run_dir} is not empty: pass --resume to finish it, or choose a new folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and jobs_path.exists():
            _check_same_jobs(jobs, jobs_path)
        jobs_path.write_text(json.dumps([job.to_dict() for job in jobs], indent=2))
    state.wait_for_everyone()

    pipelines = pipelines or PipelineCache(device="cpu" if device == "cpu" else str(state.device))
    mine = list(range(state.process_index, len(jobs), state.num_processes))
    done, skipped, failed = [], [], {}
    bar = tqdm(mine, desc=f"jobs (process {state.process_index})", disable=not progress, position=state.process_index)
    for index in bar:
        stem = _stem(index)
        if resume and (run_dir / f"{stem}.json").exists() and (run_dir / f"{stem}.png").exists():
            skipped.append(index)
            continue
        job = jobs[index]
        start = time.perf_counter()
        try:
            result = run_job(job, pipelines)
        except Exception as error:  # one bad job must not cost the rest of the batch
            message = f"{type(error).__name__}: {error}"
            logger.error("job %s failed: %s", stem, message)
            failure = {"index": index, "job": job.to_dict(), "error": message, "traceback": traceback.format_exc()}
            (run_dir / f"{stem}.error.json").write_text(json.dumps(failure, indent=2))
            failed[index] = message
            continue
        save_result(
            run_dir, stem, job, result, time.perf_counter() - start, str(state.device), index, state.process_index
        )
        done.append(index)
    state.wait_for_everyone()
    if state.is_main_process:
        write_manifest(run_dir, jobs)
    return BatchReport(run_dir=run_dir, done=done, failed=failed, skipped=skipped)


def _check_same_jobs(jobs: list[Job], jobs_path: Path) -> None:
    saved = json.loads(jobs_path.read_text())
    if saved != [job.to_dict() for job in jobs]:
        raise JobError(
            f"--resume: the jobs differ from those {jobs_path.parent} was started with; resume with the same job "
            "file and options, or start a new run folder"
        )


def write_manifest(run_dir: Path, jobs: list[Job]) -> dict[str, Any]:
    """Summarize the run folder from the files themselves, so it is right after any mix of processes and resumes."""
    entries = []
    for index, job in enumerate(jobs):
        stem = _stem(index)
        entry: dict[str, Any] = {"index": index, "kind": job.kind, "name": job.name, "seed": job.seed}
        error_path = run_dir / f"{stem}.error.json"
        if (run_dir / f"{stem}.json").exists():
            entry.update(status="done", image=f"{stem}.png", sidecar=f"{stem}.json")
        elif error_path.exists():
            entry.update(status="failed", error=json.loads(error_path.read_text())["error"])
        else:
            entry.update(status="missing")
        entries.append(entry)
    counts = {status: sum(e["status"] == status for e in entries) for status in ("done", "failed", "missing")}
    manifest = {
        "run_dir": str(run_dir),
        "updated": dt.datetime.now().isoformat(timespec="seconds"),
        "num_jobs": len(jobs),
        **counts,
        "versions": versions(),
        "jobs": entries,
    }
    (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def saved_jobs(run_dir: str | Path) -> list[Job]:
    """The jobs a run folder was started with (``--resume`` without the job file)."""
    path = Path(run_dir) / JOBS_FILE
    if not path.exists():
        raise JobError(f"{run_dir} has no {JOBS_FILE}: it is not an attncontrol run folder")
    data = json.loads(path.read_text())
    return [Job.from_dict(raw, where=f"{path} job {i + 1}") for i, raw in enumerate(data)]


def validate(jobs: list[Job]) -> dict[int, str]:
    """Errors by job index from opening every input (``--dry-run``); no model is loaded."""
    errors = {}
    for index, job in enumerate(jobs):
        try:
            job.check_inputs(where=f"job {_stem(index)}")
        except JobError as error:
            errors[index] = str(error)
    return errors


__all__ = ["BatchReport", "new_run_dir", "run_batch", "saved_jobs", "slug", "validate", "write_manifest"]
