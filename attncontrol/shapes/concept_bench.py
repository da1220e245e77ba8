"""Concept-extraction bench on the shapes world: learn one token per object of a rendered two-object scene, then
check that ``"a photo of <token_i>"`` draws object i (colour and shape) and not the other one.

The scenes are rendered, so the masks are exact and the identity of every generated object is decided by the
detector. :func:`concept_scenes` picks the scenes, :func:`score_token_image` scores one generated image,
:func:`failure_kind` says what a failed one drew instead, and :func:`run_concept_case` trains one method on one scene
and scores its samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attncontrol.shapes.bench import objects_present
from attncontrol.shapes.detector import DetectedObject, detect
from attncontrol.shapes.scenes import Scene, SceneGenerator

#: The methods the bench compares, as changes to the training configuration's defaults.
METHODS: dict[str, dict[str, Any]] = {
    # Break-A-Scene: user masks, masked loss, cross-attention loss, embeddings then LoRA.
    "user-masks": {"mask_source": "user"},
    # AttenCraft's masks (from the model's own attention) in the same training.
    "attention-masks": {"mask_source": "attention", "sampling": "attencraft"},
    # Baselines on the same budget, without the attention loss (and without masks: "plain").
    "textual-inversion": {"mask_source": "user", "masked_loss": False, "attention_loss": "none", "phase2_steps": 0},
    "dreambooth-lora": {"mask_source": "user", "masked_loss": False, "attention_loss": "none"},
    # The masked variants, to separate what the masks and what the attention loss bring.
    "textual-inversion-masked": {"mask_source": "user", "attention_loss": "none", "phase2_steps": 0},
    "dreambooth-lora-masked": {"mask_source": "user", "attention_loss": "none"},
}

#: Not a training method: each object named in words ("a photo of a green square"), sampled and scored like a token.
#: What the model draws from the words themselves is the ceiling a learned token can be expected to reach.
WORDS = "words"


def caption_words(scenes: int = 3000, seed: int = 0) -> list[str]:
    """Every word of the shapes world's captions: the vocabulary the shapes models were trained on, the candidates
    a concept's initializer search picks from on them (``Config.init_words``)."""
    generator = SceneGenerator(seed)
    words: set[str] = set()
    for index in range(scenes):
        words.update(generator.scene(index).caption.replace(",", " ").split())
    return sorted(words)


def concept_scenes(count: int, seed: int = 4242) -> list[Scene]:
    """``count`` two-object scenes whose objects differ in colour *and* shape, so "the other one" is unambiguous."""
    generator = SceneGenerator(seed, max_objects=2, count_weights=(0.0, 1.0))
    scenes, index = [], 0
    while len(scenes) < count:
        scene = generator.scene(index)
        index += 1
        first, second = scene.objects
        if first.color != second.color and first.shape != second.shape:
            scenes.append(scene)
    return scenes


def score_token_image(detected: Sequence[DetectedObject], wanted: tuple[str, str], other: tuple[str, str]) -> bool:
    """Object ``wanted`` (colour, shape) is drawn and ``other`` is not: :func:`failure_kind` finds nothing wrong."""
    return failure_kind([(d.color, d.shape) for d in detected], wanted, other) is None


#: Why a token image failed, from the most to the least right; :func:`failure_kind` picks the first that applies.
FAILURE_KINDS = ("both objects", "the other object", "its shape, wrong colour", "its colour, wrong shape", "neither")


def failure_kind(found: Sequence[tuple[str, str]], wanted: tuple[str, str], other: tuple[str, str]) -> str | None:
    """Why a token image with these detected (colour, shape) pairs failed, or None when it succeeded. Tells apart a
    token that learned its object's shape but not its colour from one that drew the other object."""
    has_wanted, has_other = wanted in found, other in found
    if has_wanted:
        return FAILURE_KINDS[0] if has_other else None
    if has_other:
        return FAILURE_KINDS[1]
    if any(shape == wanted[1] for _, shape in found):
        return FAILURE_KINDS[2]
    if any(color == wanted[0] for color, _ in found):
        return FAILURE_KINDS[3]
    return FAILURE_KINDS[4]


def sample_image_name(token: int, seed: int) -> str:
    """A scored sample's file name: ``token{i}-{seed}.png`` for token i, ``joint-{seed}.png`` for token -1 (all)."""
    return f"{'joint' if token < 0 else f'token{token}'}-{seed:03d}.png"


def token_of_image(name: str) -> int:
    """The token index back from :func:`sample_image_name`; -1 for the joint prompt."""
    prefix = name.split("-", 1)[0]
    return int(prefix[len("token") :]) if prefix.startswith("token") else -1


def describe_detection(obj: DetectedObject) -> str:
    """What a report keeps of one detection, compactly: ``"colour shape @ (x, y) area"``."""
    return f"{obj.color} {obj.shape} @ ({obj.centroid[0]:.0f}, {obj.centroid[1]:.0f}) {obj.area}"


def detected_pairs(described: Sequence[str]) -> list[tuple[str, str]]:
    """(colour, shape) pairs back from :func:`describe_detection`'s strings in a report."""
    pairs = []
    for text in described:
        color, shape = text.split(" @ ", 1)[0].split(" ", 1)
        pairs.append((color, shape))
    return pairs


def case_failures(case: dict) -> list[str]:
    """The failure kind of every failed token image of one reported case (``ConceptCaseResult.to_json()``)."""
    objects = [tuple(obj) for obj in case["objects"]]
    kinds = []
    for detail in case["details"]:
        which = token_of_image(detail["image"])
        if which < 0 or detail["success"]:
            continue
        kind = failure_kind(detected_pairs(detail["detected"]), objects[which], objects[1 - which])
        if kind:  # always, for a failed image of a two-object scene
            kinds.append(kind)
    return kinds


@dataclass
class ConceptCaseResult:
    """One method trained on one scene: per-token successes over the samples, and the joint prompt's."""

    method: str
    scene: int
    objects: list[tuple[str, str]]
    token_successes: list[int]
    samples: int
    joint_successes: int
    train_minutes: float
    steps: int
    details: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def save_case_inputs(scene: Scene, folder: Path) -> tuple[Path, list[Path]]:
    """The scene's image and one mask per object as PNG files (what a user would hand the training script)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)
    masks = []
    for index, obj in enumerate(scene.objects):
        path = folder / f"mask{index}.png"
        Image.fromarray((obj.mask * 255).astype(np.uint8)).save(path)
        masks.append(path)
    return image, masks


@torch.no_grad()
def score_concepts(
    pipe: Any,
    tokens: Sequence[str],
    objects: Sequence[tuple[str, str]],
    *,
    template: str,
    samples: int,
    steps: int,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch: int = 16,
    image_folder: Path | None = None,
) -> tuple[list[int], int, list[dict]]:
    """Generate ``samples`` images of each token alone and of all tokens together; count the successes."""
    from attncontrol.concepts import concept_prompt

    jobs = [(index, template.format(token)) for index, token in enumerate(tokens)]
    jobs.append((-1, concept_prompt(list(tokens), template)))
    successes = [0] * len(tokens)
    joint = 0
    details = []
    for which, prompt in jobs:
        for start in range(0, samples, batch):
            seeds = list(range(seed + start, seed + min(samples, start + batch)))
            images = pipe(
                [prompt] * len(seeds),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            ).images
            for sample_seed, image in zip(seeds, images, strict=True):
                detected = detect(image)
                if which >= 0:
                    other = objects[1 - which] if len(objects) == 2 else None
                    ok = (
                        score_token_image(detected, objects[which], other)
                        if other
                        else objects_present(detected, [objects[which]])
                    )
                    successes[which] += int(ok)
                else:
                    ok = objects_present(detected, list(objects))
                    joint += int(ok)
                name = sample_image_name(which, sample_seed)
                if image_folder is not None:
                    image_folder.mkdir(parents=True, exist_ok=True)
                    image.save(image_folder / name)
                details.append(
                    {
                        "prompt": prompt,
                        "seed": sample_seed,
                        "image": name,
                        "success": ok,
                        "detected": [describe_detection(d) for d in detected],
                    }
                )
    return successes, joint, details


def run_concept_case(
    method: str,
    scene_index: int,
    scene: Scene,
    folder: Path,
    *,
    base: Any,
    samples: int,
    steps: int,
) -> ConceptCaseResult:
    """Train ``method`` on ``scene`` (config ``base`` with the method's changes) and score its samples; the
    :data:`WORDS` method trains nothing and scores the objects named in words instead."""
    from attncontrol.training.concepts import train_concepts

    objects = [(obj.color, obj.shape) for obj in scene.objects]
    if method == WORDS:
        from attncontrol.models import load_pipeline

        pipe = load_pipeline(base.model)
        pipe.set_progress_bar_config(disable=True)
        phrases = [f"a {color} {shape}" for color, shape in objects]
        successes, joint, details = score_concepts(
            pipe,
            phrases,
            objects,
            template=base.template,
            samples=samples,
            steps=steps,
            image_folder=folder / "samples",
        )
        return ConceptCaseResult(method, scene_index, objects, successes, samples, joint, 0.0, 0, details)
    image, masks = save_case_inputs(scene, folder / "inputs")
    changes = dict(METHODS[method])
    if changes.get("phase2_steps") == 0:
        # Same budget: textual inversion spends phase 2's steps on the embeddings too.
        changes["phase1_steps"] = base.phase1_steps + base.phase2_steps
    use_masks = changes.get("mask_source", "user") != "attention"
    config = replace(
        base,
        out=str(folder / "run"),
        image=str(image),
        masks=[str(m) for m in masks] if use_masks else [],
        num_concepts=len(scene.objects),
        initializers=[obj.shape for obj in scene.objects],
        **changes,
    )
    started = time.perf_counter()
    trained = train_concepts(config)
    minutes = (time.perf_counter() - started) / 60
    successes, joint, details = score_concepts(
        trained.pipeline,
        trained.tokens,
        objects,
        template=config.template,
        samples=samples,
        steps=steps,
        image_folder=folder / "samples",
    )
    return ConceptCaseResult(
        method=method,
        scene=scene_index,
        objects=objects,
        token_successes=successes,
        samples=samples,
        joint_successes=joint,
        train_minutes=minutes,
        steps=trained.metrics["steps"],
        details=details,
    )
