"""Pieces every training script shares: atomic checkpoints with RNG state, EMA, LR schedule, config CLI, probes."""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import logging
import math
import os
import platform
import random
import textwrap
import time
import tokenize
from contextlib import ExitStack
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from attncontrol.core.controller import AttentionController
from attncontrol.shapes.bench import objects_present, single_object_cases
from attncontrol.shapes.detector import detect

ConfigT = TypeVar("ConfigT")
logger = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write never destroys the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@torch.no_grad()
def ema_update(pairs: list[tuple[torch.nn.Module, torch.nn.Module]], step: int, max_decay: float) -> None:
    """EMA with the usual warm-up ``(1 + step) / (10 + step)`` so early weights are not frozen in."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for ema, live in pairs:
        for ema_param, param in zip(ema.parameters(), live.parameters(), strict=True):
            ema_param.lerp_(param, 1 - decay)


MIXED_PRECISION = ("auto", "no", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_info() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags from Linux's /proc/cpuinfo (``("", set())`` elsewhere): the machine
    label alone (x86_64) does not tell an AMX machine from an AVX2-only one, which train ~2x apart."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX or AVX512-BF16). Only then does autocast pay on the CPU:
    the shapes-sd step took 0.73x the fp32 time with AMX, and 8.8-9.5x on an AVX2 EPYC, where every bf16 op is
    emulated (benchmarks/results/training-precision-cpu*.json)."""
    return bool(cpu_info()[1] & {"amx_bf16", "avx512_bf16"})


def cpu_label(threads: int) -> str:
    """How a CPU result names its machine: model, architecture, whether bf16 is native, threads. Timings on these
    CPUs differ ~2x between an AMX machine and an AVX2-only one that ``platform.processor()`` names alike."""
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    model = cpu_info()[0] or platform.processor() or "unknown CPU"
    return f"CPU ({model}, {platform.machine()}, {native}, {threads} threads)"


def bf16_is_fast(device: torch.device) -> bool:
    """A CUDA device with bf16, or a CPU with native bf16 (:func:`cpu_has_native_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def warn_if_bf16_emulated(mixed_precision: str, device: torch.device) -> None:
    """Every training script's check: bf16 on a CPU that emulates it runs about 9x slower than fp32, and the
    training budgets are wall-clock minutes, so a user who asked for it should hear so before the run."""
    if mixed_precision == "bf16" and not bf16_is_fast(device):
        logger.warning(
            "--mixed-precision bf16 on %s without native bf16: every op is emulated (about 9x the fp32 step time on an "
            "AVX2 CPU); fp32 (--mixed-precision no) is faster here",
            device,
        )


def resolve_mixed_precision(mixed_precision: str, device: torch.device) -> str:
    """``"auto"`` becomes ``"bf16"`` where it is fast (:func:`bf16_is_fast`) and ``"no"`` elsewhere; an explicit
    ``"bf16"`` is kept, with a warning where it is emulated (:func:`warn_if_bf16_emulated`)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    fast = bf16_is_fast(device)
    if mixed_precision == "auto":
        resolved = "bf16" if fast else "no"
        logger.info("mixed precision auto: %s (%s)", resolved, "native bf16" if fast else f"no fast bf16 on {device}")
        return resolved
    warn_if_bf16_emulated(mixed_precision, device)
    return mixed_precision


def save_run_config(config: Any) -> Path:
    """Create the run's output folder (``config.out``) and write the settings that run into its ``config.json``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return out


def start_run(config: Any):
    """The prelude the distillers and the concepts trainer share: an accelerator for ``config.mixed_precision``, a
    warning where this machine would emulate bf16, the output folder with ``config.json``, and the seed.

    ``cpu=True`` without CUDA, so ``accelerate launch`` runs its processes on the CPU over gloo. Returns
    (accelerator, out).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    warn_if_bf16_emulated(config.mixed_precision, accelerator.device)
    out = save_run_config(config)
    torch.manual_seed(config.seed)
    return accelerator, out


def finish_processes() -> None:
    """End an ``accelerate launch`` run together: every process waits for the others (the main one validates and
    exports alone), then the process group comes down. A process that exits while the group is still up can abort in
    gloo's teardown ("terminate called without an active exception"), which fails the whole launch. A no-op in a plain
    single-process run."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
    state.destroy_process_group()


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's precision: ``"bf16"`` autocasts (weights, optimizer and loss stay fp32), ``"no"`` is fp32.
    ``"auto"`` must have been resolved first (:func:`resolve_mixed_precision`).

    On CPUs with AMX, bf16 convolutions and matmuls run about 3x faster than fp32; the attention core stays fp32
    under the training controller (:func:`training_controller`), where bf16 would be slower.
    """
    if mixed_precision not in MIXED_PRECISION[1:]:
        raise ValueError(
            f'`mixed_precision` must be one of {MIXED_PRECISION[1:]} (resolve "auto" first), got {mixed_precision!r}'
        )
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_controller(stack: ExitStack, model: torch.nn.Module) -> AttentionController:
    """One attention controller for a whole training loop, with no controls until a loss adds its store.

    With no controls its processors reproduce the stock ones, except that under CPU autocast they run the attention
    core in fp32 (:func:`attncontrol.core.compute.attention`), which is what makes bf16 training pay on the CPU; the
    grounding loss adds its store to it. Entered on ``stack``, it comes off when the loop ends, also on an exception.
    """
    controller = stack.enter_context(AttentionController(model, []))
    # Training calls carry random timesteps: one step of their own, so no schedule is looked up.
    controller.set_step(0, num_steps=1)
    return controller


def layer_outputs(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, Any], list]:
    """Forward hooks keeping each named submodule's output of the latest call (feature-matching losses);
    returns the dict they fill and the handles to remove."""
    outputs: dict[str, Any] = {}
    handles = []
    for name in names:

        def hook(module, args, output, name=name):
            outputs[name] = output

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return outputs, handles


def recent_mean(values: list[float], count: int = 200) -> float | None:
    """Mean of the last ``count`` recorded values (NaN: a step without the term), ``None`` if there are none."""
    recent = [value for value in values[-count:] if not math.isnan(value)]
    return float(np.mean(recent)) if recent else None


class LossLog:
    """The per-step loss terms a shapes training loop keeps, for its progress bar, probe history and final metrics.

    ``add`` takes the step's terms by name: ``"diffusion"`` always, the others (``"grounding"``, ``"binding"``, ...)
    on the steps that have them; a term a step lacks (before its start, or when it is off) is recorded as NaN.
    """

    # Optional terms every record names, present or not, so the metrics keep one shape across runs.
    OPTIONAL = ("grounding",)

    def __init__(self) -> None:
        self.terms: dict[str, list[float]] = {"diffusion": []}

    @property
    def losses(self) -> list[float]:
        return self.terms["diffusion"]

    def add(self, terms: dict[str, float]) -> None:
        count = len(self.losses)
        for name in terms:
            self.terms.setdefault(name, [float("nan")] * count)
        for name, values in self.terms.items():
            values.append(terms.get(name, float("nan")))

    def _recent(self, count: int) -> dict[str, float | None]:
        means = {name: recent_mean(self.terms.get(name, []), count) for name in self.OPTIONAL}
        means.update({name: recent_mean(values, count) for name, values in self.terms.items() if name != "diffusion"})
        return means

    def postfix(self) -> dict[str, str]:
        shown = {"loss": f"{np.mean(self.losses[-50:]):.4f}"}
        shown.update({name: f"{value:.4f}" for name, value in self._recent(50).items() if value is not None})
        return shown

    def probe_entry(self, step: int, minutes: float, probe: float) -> dict:
        recent = {_metric_name(name): value for name, value in self._recent(200).items()}
        return {
            "step": step,
            "minutes": minutes,
            "loss": recent_mean(self.losses),
            **recent,
            "single_object_probe": probe,
        }

    def final(self) -> dict[str, float | None]:
        recent = {f"final_{_metric_name(name)}": value for name, value in self._recent(200).items()}
        return {"final_loss": recent_mean(self.losses), **recent}


def _metric_name(term: str) -> str:
    """``grounding`` -> ``grounding_loss``; measurements that are not losses (``binding_accuracy``) keep their name."""
    return term if term.endswith("_accuracy") else f"{term}_loss"


class StageClock:
    """A training stage's two budgets, steps and wall-clock minutes, with the minutes carried over ``--resume`` like
    the step count: a resumed run stops where an uninterrupted one would, and its learning rate goes on from the same
    point of the schedule."""

    def __init__(self, steps: int, budget_minutes: float, spent: float = 0.0):
        self.steps, self.budget_minutes = steps, budget_minutes
        self.spent = spent  # minutes of earlier runs of the stage (from its checkpoint)
        self.started = time.perf_counter()

    def minutes(self) -> float:
        return self.spent + (time.perf_counter() - self.started) / 60

    def running(self, step: int) -> bool:
        """Whether both budgets have room for another step."""
        return step < self.steps and self.minutes() < self.budget_minutes

    def progress(self, step: int) -> float:
        """The larger share spent of the two budgets (``warmup_cosine``'s ``progress``)."""
        return max(step / max(1, self.steps), self.minutes() / self.budget_minutes)

    def learning_rate(self, step: int, *, base_lr: float, warmup: int) -> float:
        """:func:`warmup_cosine` over this stage's budgets: the rate reaches its floor whichever budget ends first."""
        return warmup_cosine(step, base_lr=base_lr, warmup=warmup, total=self.steps, progress=self.progress(step))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the rate ``lr`` (the schedules here are set per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(
    step: int, *, base_lr: float, warmup: int, total: int, floor: float = 0.1, progress: float | None = None
) -> float:
    """Linear warm-up, then cosine decay to ``floor * base_lr``.

    ``progress`` is the share of the stage's budget spent (default ``step / total``). A stage that a wall-clock budget
    may end before its last step passes the larger of its step and time shares, so the rate reaches its floor
    whichever runs out first instead of stopping mid-schedule on a slower machine."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    share = step / max(1, total) if progress is None else progress
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, share)))
    return base_lr * warm * (floor + (1 - floor) * decay)


def field_comments(config_cls: type) -> dict[str, str]:
    """Each dataclass field's comment, from the source: the comment lines right above the field and the one at the
    end of its line, joined. The comments are where the settings are explained, so ``--help`` reads them there
    instead of keeping a second copy that drifts. Subclasses override their bases' comments; a class whose source
    cannot be read (a frozen app) contributes none."""
    comments: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        line_comments: dict[int, str] = {}
        comment_only: set[int] = set()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                row = token.start[0]
                line_comments[row] = token.string.lstrip("#:").strip()
                if not token.line[: token.start[1]].strip():
                    comment_only.add(row)
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above: list[str] = []
            row = node.lineno - 1
            while row in comment_only:
                above.insert(0, line_comments[row])
                row -= 1
            end = node.end_lineno
            trailing = [line_comments[end]] if end in line_comments and end not in comment_only else []
            text = " ".join(part for part in above + trailing if part)
            if text:
                comments[node.target.id] = text
    return comments


def _flag_help(comment: str, value: Any) -> str:
    shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    default = "none" if shown == "" else shown
    return f"{comment} (default: {default})".replace("%", "%%").lstrip()


def parse_config(config_cls: type[ConfigT], description: str, argv: list[str] | None, extra: Any = None):
    """Every dataclass field becomes a ``--flag`` whose help is the field's comment (:func:`field_comments`);
    ``extra(parser)`` may add more. Returns (config, args)."""
    defaults = config_cls()
    comments = field_comments(config_cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for item in fields(config_cls):
        value = getattr(defaults, item.name)
        flag = "--" + item.name.replace("_", "-")
        text = _flag_help(comments.get(item.name, ""), value)
        if isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=value, help=text)
        elif isinstance(value, list):
            parser.add_argument(flag, nargs="*", type=str, default=value, help=text)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=text)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in asdict(defaults)}
    values = {k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v for k, v in values.items()}
    return config_cls(**values), args


def start_shapes_run(config_cls: type[ConfigT], description: str, argv: list[str] | None, extra: Any = None):
    """The prelude the shapes-world training scripts share: flags, logging, threads, the accelerator, the mixed
    precision resolved for this machine (:func:`resolve_mixed_precision`), the output folder with the settings that
    run in ``config.json``, and the seeds. Returns (config, args, out, accelerator)."""
    from accelerate import Accelerator

    config, args = parse_config(config_cls, description, argv, extra=extra)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    config = replace(config, mixed_precision=resolve_mixed_precision(config.mixed_precision, accelerator.device))
    out = save_run_config(config)
    random.seed(config.seed)
    np.random.seed(config.seed)
    return config, args, out, accelerator


@torch.no_grad()
def probe_single_objects(pipeline, steps: int, num_seeds: int = 2, **call_kwargs) -> float:
    """Share of single-object prompts drawn with the right colour and shape (a quick slice of the bench), called the
    way the bench calls the pipeline's family (:func:`attncontrol.models.family_call_kwargs`)."""
    from attncontrol.models import family_call_kwargs

    cases = single_object_cases(num_seeds, seed_offset=500)
    call_kwargs = family_call_kwargs(pipeline, call_kwargs, len(cases))
    generators = [torch.Generator("cpu").manual_seed(case.seed) for case in cases]
    images = pipeline(
        [case.prompt for case in cases],
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=generators,
        **call_kwargs,
    ).images
    hits = sum(objects_present(detect(image), case.expected) for case, image in zip(cases, images, strict=True))
    return hits / len(cases)
