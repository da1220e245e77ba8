"""Jobs: one validated, JSON-able description of a generation or an edit, run the same way by the CLI, batches and
the app.

A job is plain data, so it is written as a sidecar beside its image and that sidecar runs again to the same pixels.
Kinds: ``generate`` (a prompt, optional heat maps), ``regional`` (regions with their own prompts or phrases, each a
mask file or a box), ``remove`` (an object under a mask), ``move`` (drag an object by an offset or into a box) and
``compose`` (paste a reference object into a box of a background).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attncontrol.core.errors import AttnControlError
from attncontrol.core.masks import load_mask

logger = logging.getLogger(__name__)

JOB_KINDS = ("generate", "regional", "remove", "move", "compose")
#: the number of steps and guidance a kind runs with when the job does not say (edits follow DesignEdit: 50 DDIM
#: steps, no guidance, because the inversion is exact only without it)
DEFAULT_STEPS = {"generate": 20, "regional": 20, "remove": 50, "move": 50, "compose": 50}
DEFAULT_GUIDANCE = {"generate": 7.5, "regional": 7.5, "remove": 1.0, "move": 1.0, "compose": 1.0}
#: which optional fields each kind reads (a field another kind reads is an error, not silently ignored)
KIND_FIELDS = {
    "generate": {"heatmaps", "concepts"},
    "regional": {"regions", "region_mode", "base_weight", "heatmaps", "concepts"},
    "remove": {"image", "mask"},
    "move": {"image", "mask", "offset", "target_box"},
    "compose": {"image", "reference_image", "reference_mask", "box"},
}
REQUIRED_FIELDS = {
    "generate": ("prompt",),
    "regional": ("regions",),
    "remove": ("image", "mask"),
    "move": ("image", "mask"),
    "compose": ("image", "reference_image", "reference_mask", "box"),
}
PATH_FIELDS = ("image", "mask", "reference_image", "reference_mask")
REGION_KEYS = {"prompt", "phrase", "mask", "box", "weight"}


class JobError(AttnControlError, ValueError):
    """A job description that cannot run; the message names the job and the field."""


@dataclass
class Job:
    """What to run. Paths are absolute once parsed (``from_dict`` resolves them against the job file's folder)."""

    kind: str = "generate"
    prompt: str = ""
    negative_prompt: str | None = None
    model: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)
    region_mode: str = "hard"
    base_weight: float = 1.0
    image: str | None = None
    mask: str | None = None
    offset: list[float] | None = None
    target_box: list[float] | None = None
    reference_image: str | None = None
    reference_mask: str | None = None
    box: list[float] | None = None
    heatmaps: list[str] = field(default_factory=list)
    #: a concept-training run folder whose tokens the prompt may use (loaded for this job, then taken out again)
    concepts: str | None = None
    #: further keyword arguments of the pipeline call (e.g. ``dilation`` for moves, ``region_options``)
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    @property
    def num_inference_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.kind]

    @property
    def guidance(self) -> float:
        return self.guidance_scale if self.guidance_scale is not None else DEFAULT_GUIDANCE[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-able data, without fields left at their defaults (sidecars stay readable)."""
        defaults = Job()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in ("kind", "seed") or getattr(self, f.name) != getattr(defaults, f.name)
        }

    def resolved(self) -> Job:
        """The job with the model, steps and guidance it actually ran with written in, so a sidecar reruns the same
        way after a default changes."""
        from attncontrol.models import default_model

        return dataclasses.replace(
            self, model=self.model or default_model(), steps=self.num_inference_steps, guidance_scale=self.guidance
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None, where: str = "job") -> Job:
        """Check every field of ``raw`` (names, types, which kind reads it) and build the job.

        ``where`` names the job in errors ("jobs.jsonl line 3"); relative paths are taken from ``base_dir``.
        """
        if not isinstance(raw, Mapping):
            raise JobError(f"{where}: a job must be a mapping of fields, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise JobError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        kind = raw.get("kind", "generate")
        if kind not in JOB_KINDS:
            raise JobError(f"{where}: `kind` must be one of {JOB_KINDS}, got {kind!r}")
        for name in REQUIRED_FIELDS[kind]:
            if raw.get(name) in (None, "", []):
                raise JobError(f"{where}: a {kind!r} job needs `{name}`")
        optional = {f.name for f in dataclasses.fields(cls) if f.name not in set().union(*KIND_FIELDS.values())}
        for name in raw:
            if name not in optional and name not in KIND_FIELDS[kind]:
                readers = [k for k, fields in KIND_FIELDS.items() if name in fields]
                raise JobError(f"{where}: `{name}` is read by {readers} jobs, not by {kind!r} jobs")

        job = cls(kind=kind)
        _set(job, raw, "prompt", str, where)
        _set(job, raw, "negative_prompt", str, where)
        _set(job, raw, "model", str, where)
        _set(job, raw, "name", str, where)
        _set(job, raw, "region_mode", str, where)
        _set(job, raw, "seed", int, where, minimum=0)
        _set(job, raw, "steps", int, where, minimum=1)
        _set(job, raw, "height", int, where, minimum=8)
        _set(job, raw, "width", int, where, minimum=8)
        _set(job, raw, "guidance_scale", float, where, minimum=0.0)
        _set(job, raw, "base_weight", float, where, minimum=0.0)
        for name in ("offset", "target_box", "box"):
            length = 2 if name == "offset" else 4
            if raw.get(name) is not None:
                setattr(job, name, _numbers(raw[name], length, f"{where}: `{name}`"))
        if kind == "move" and (job.offset is None) == (job.target_box is None):
            raise JobError(f"{where}: a 'move' job needs exactly one of `offset` (dx, dy) or `target_box`")
        if job.region_mode not in ("hard", "soft"):
            raise JobError(f"{where}: `region_mode` must be 'hard' or 'soft', got {job.region_mode!r}")
        for name in (*PATH_FIELDS, "concepts"):
            if raw.get(name) is not None:
                setattr(job, name, _path(raw[name], base_dir, f"{where}: `{name}`"))
        if raw.get("regions") is not None:
            job.regions = _regions(raw["regions"], base_dir, where)
        heatmaps = raw.get("heatmaps", [])
        if isinstance(heatmaps, str) or not all(isinstance(w, str) and w.strip() for w in heatmaps):
            raise JobError(f"{where}: `heatmaps` must be a list of words of the prompt, got {heatmaps!r}")
        job.heatmaps = list(heatmaps)
        options = raw.get("options", {})
        if not isinstance(options, Mapping):
            raise JobError(f"{where}: `options` must be a mapping of pipeline arguments, got {options!r}")
        job.options = dict(options)
        return job

    def check_inputs(self, where: str = "job") -> None:
        """Open every input file and check masks against their images, without running a model (``--dry-run``)."""
        try:
            self.load_inputs()
        except (OSError, AttnControlError) as error:
            raise JobError(f"{where}: {error}") from error

    def load_inputs(self) -> dict[str, Any]:
        """Images as RGB PIL images and masks as ``[H, W]`` tensors checked against their image's size."""
        inputs: dict[str, Any] = {}
        for image_field, mask_field in (("image", "mask"), ("reference_image", "reference_mask")):
            path = getattr(self, image_field)
            if path is None:
                continue
            image = _open(path, image_field).convert("RGB")
            inputs[image_field] = image
            mask_path = getattr(self, mask_field)
            if mask_path is not None:
                size = (image.height, image.width)
                inputs[mask_field] = load_mask(_open(mask_path, mask_field), name=mask_field, image_size=size)
        for index, region in enumerate(self.regions):
            if "mask" in region:
                inputs[f"regions[{index}]"] = _open(region["mask"], f"regions[{index}].mask")
        if self.concepts is not None and not (Path(self.concepts) / "concepts.json").is_file():
            raise JobError(f"`concepts` is not a concept-training run folder (no concepts.json): {self.concepts}")
        return inputs


def _set(job: Job, raw: Mapping[str, Any], name: str, kind: type, where: str, minimum: float | None = None) -> None:
    if raw.get(name) is None:
        return
    value = raw[name]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise JobError(f"{where}: `{name}` must be {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise JobError(f"{where}: `{name}` must be >= {minimum}, got {value!r}")
    setattr(job, name, value)


def _numbers(value: Any, length: int, name: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise JobError(f"{name} must be {length} numbers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise JobError(f"{name} must be {length} finite numbers, got {value!r}")
    return [float(v) for v in value]


def _path(value: Any, base_dir: Path | None, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(f"{name} must be a file path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path.resolve())


def _regions(value: Any, base_dir: Path | None, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        raise JobError(f"{where}: `regions` must be a non-empty list, got {value!r}")
    regions = []
    for index, region in enumerate(value):
        name = f"{where}: `regions[{index}]`"
        if not isinstance(region, Mapping):
            raise JobError(f"{name} must be a mapping with `prompt` or `phrase` and `mask` or `box`, got {region!r}")
        unknown = sorted(set(region) - REGION_KEYS)
        if unknown:
            raise JobError(f"{name}: unknown key(s) {unknown}; known: {sorted(REGION_KEYS)}")
        if ("prompt" in region) == ("phrase" in region):
            raise JobError(f"{name} needs exactly one of `prompt` (its own prompt) or `phrase` (a span of the prompt)")
        if ("mask" in region) == ("box" in region):
            raise JobError(f"{name} needs exactly one of `mask` (an image file) or `box` (x0, y0, x1, y1)")
        text = region.get("prompt", region.get("phrase"))
        if not isinstance(text, str) or not text.strip():
            raise JobError(f"{name}: the text must be a non-empty string, got {text!r}")
        clean: dict[str, Any] = {"prompt" if "prompt" in region else "phrase": text}
        if "mask" in region:
            clean["mask"] = _path(region["mask"], base_dir, f"{name}.mask")
        else:
            clean["box"] = _numbers(region["box"], 4, f"{name}.box")
        if "weight" in region:
            weight = region["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise JobError(f"{name}.weight must be a number >= 0, got {weight!r}")
            clean["weight"] = float(weight)
        regions.append(clean)
    return regions


def _open(path: str, name: str) -> Image.Image:
    if not Path(path).is_file():
        raise JobError(f"`{name}` file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as error:
        raise JobError(f"`{name}` is not a readable image: {path} ({error})") from error


# ---------------------------------------------------------------------------------------------------- job files
def read_jobs(path: str | Path, *, seeds: Sequence[int] | None = None) -> list[Job]:
    """Jobs from a JSONL file (one job per line), a JSON list, a YAML list or ``{defaults:, jobs:}`` mapping, or a
    sidecar written next to an image (its ``job`` runs again). ``seeds`` repeats every job once per seed.

    Every job is checked here, so a typo in job 40 stops the batch before job 1 runs.
    """
    path = Path(path)
    if not path.is_file():
        raise JobError(f"job file not found: {path}")
    text = path.read_text()
    entries: list[tuple[str, Any]]
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append((f"{path.name} line {number}", _parse_json(line, f"{path.name} line {number}")))
        defaults: Mapping[str, Any] = {}
    else:
        data = _parse_yaml(text, path.name) if path.suffix in (".yaml", ".yml") else _parse_json(text, path.name)
        defaults = {}
        if isinstance(data, Mapping) and "job" in data:  # a sidecar
            data = [data["job"]]
        elif isinstance(data, Mapping) and "jobs" in data:
            defaults = data.get("defaults") or {}
            if not isinstance(defaults, Mapping):
                raise JobError(f"{path.name}: `defaults` must be a mapping of job fields")
            data = data["jobs"]
        elif isinstance(data, Mapping):
            data = [data]
        if not isinstance(data, list):
            raise JobError(f"{path.name}: expected a list of jobs, got {type(data).__name__}")
        entries = [(f"{path.name} job {number}", item) for number, item in enumerate(data, start=1)]
    if not entries:
        raise JobError(f"{path.name} holds no jobs")
    jobs = []
    for where, raw in entries:
        merged = {**defaults, **raw} if isinstance(raw, Mapping) else raw
        jobs.append(Job.from_dict(merged, base_dir=path.parent, where=where))
    return expand_seeds(jobs, seeds)


def expand_seeds(jobs: Iterable[Job], seeds: Sequence[int] | None) -> list[Job]:
    """Each job once per seed (seed-major within a job), or the jobs as they are when ``seeds`` is empty."""
    if not seeds:
        return list(jobs)
    return [dataclasses.replace(job, seed=int(seed)) for job in jobs for seed in seeds]


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JobError(f"{where}: not valid JSON ({error})") from error


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobError(f"{where}: not valid YAML ({error})") from error


# ---------------------------------------------------------------------------------------------------- running
class PipelineCache:
    """Loaded pipelines by model name, one model at a time (a second model replaces the first: models are large).

    The lock serializes runs on a shared pipeline: controls install processors on it for the length of a call.
    """

    def __init__(self, *, device: str = "cpu", torch_dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.torch_dtype = torch_dtype
        self.lock = threading.RLock()
        self._name: str | None = None
        self._pipe: Any = None

    def get(self, model: str | None) -> Any:
        from attncontrol.models import default_model, load_pipeline

        name = model or default_model()
        with self.lock:
            if self._name != name:
                self._pipe = None  # free the old model before loading the new one
                self._pipe = load_pipeline(name, torch_dtype=self.torch_dtype, device=self.device)
                self._name = name
            return self._pipe


@dataclass
class JobResult:
    image: Image.Image
    #: heat maps by word, over the image
    heatmaps: dict[str, Image.Image] = field(default_factory=dict)
    #: the attention store of a generate/regional run (per-step maps), for callers that draw their own
    store: Any = None


def run_job(job: Job, pipelines: PipelineCache, *, per_step_maps: bool = False, **call_extra: Any) -> JobResult:
    """Run ``job`` on the pipeline its ``model`` names and return the image (and heat maps of ``job.heatmaps``).

    ``call_extra`` goes to the pipeline call as is (e.g. ``callback_on_step_end`` for live progress); it is not part
    of the job, so it must not change the picture.
    """
    from attncontrol.core.controller import AttentionController
    from attncontrol.core.store import AttentionStore
    from attncontrol.models import family_call_kwargs

    with pipelines.lock:
        pipe = pipelines.get(job.model)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        inputs = job.load_inputs()
        common = {
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance,
            "generator": generator,
            **job.options,
            **call_extra,
        }
        if job.kind in ("generate", "regional"):
            store = AttentionStore(guidance="cond", per_step=per_step_maps) if job.heatmaps or per_step_maps else None
            call = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, **common}
            if job.height:
                call["height"] = job.height
            if job.width:
                call["width"] = job.width
            call = family_call_kwargs(pipe, call, batch=1)
            with _concepts_loaded(pipe, job.concepts):
                probe = AttentionController(pipe, [])  # not installed: only resolves words to token positions
                tokens = {word: probe.token_indices(job.prompt, word, name="heatmaps") for word in job.heatmaps}
                if job.kind == "regional":
                    image = _run_regional(pipe, job, inputs, store, call)
                elif store is not None:
                    with AttentionController(pipe, [store]):
                        image = pipe(**call).images[0]
                else:
                    image = pipe(**call).images[0]
            heatmaps = {word: store.heatmap(indices, image=image) for word, indices in tokens.items()}
            return JobResult(image=image, heatmaps=heatmaps, store=store)
        return JobResult(image=_run_edit(pipe, job, inputs, common))


@contextlib.contextmanager
def _concepts_loaded(pipe: Any, folder: str | None) -> Iterator[None]:
    """The learned tokens and LoRA of a concept run in the shared pipeline for one job, taken out after (also on
    errors), so the next job sees the model as it was."""
    if folder is None:
        yield
        return
    from attncontrol.concepts import load_concepts, unload_concepts

    tokens = load_concepts(pipe, folder)
    try:
        yield
    finally:
        unload_concepts(pipe, tokens)


def _run_regional(pipe: Any, job: Job, inputs: dict[str, Any], store: Any, call: dict[str, Any]) -> Image.Image:
    from attncontrol.controls.regions import Region
    from attncontrol.pipelines.regional import to_regional

    regions = []
    for index, spec in enumerate(job.regions):
        where = inputs.get(f"regions[{index}]") if "mask" in spec else tuple(spec["box"])
        text = {"prompt": spec["prompt"]} if "prompt" in spec else {"phrase": spec["phrase"]}
        regions.append(Region(mask=where, weight=spec.get("weight", 1.0), **text))
    regional = to_regional(pipe)
    output = regional(
        regions=regions,
        region_mode=job.region_mode,
        base_weight=job.base_weight,
        return_attention_maps=store if store is not None else False,
        **call,
    )
    return output.images[0]


def _run_edit(pipe: Any, job: Job, inputs: dict[str, Any], common: dict[str, Any]) -> Image.Image:
    from attncontrol.pipelines.editing import RemoveMixin, to_editing
    from attncontrol.pipelines.sharing import ComposeMixin, DragMixin, to_sharing

    image = inputs["image"]
    if job.kind == "remove":
        output = to_editing(pipe, RemoveMixin)(image, inputs["mask"], job.prompt, **common)
    elif job.kind == "move":
        where = {"offset": tuple(job.offset)} if job.offset is not None else {"target_box": tuple(job.target_box)}
        output = to_sharing(pipe, DragMixin)(image, inputs["mask"], prompt=job.prompt, **where, **common)
    else:
        output = to_sharing(pipe, ComposeMixin)(
            image,
            inputs["reference_image"],
            inputs["reference_mask"],
            tuple(job.box),
            prompt=job.prompt,
            **common,
        )
    return output.images[0]
