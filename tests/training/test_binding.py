"""The colour-binding loss finds each shape word, scores its colour, trains, and is checkpointed with the run."""

from __future__ import annotations

import json

import pytest
import torch

from attncontrol.shapes import SceneGenerator
from attncontrol.testing.tiny import clip_tokenizer
from attncontrol.training import shapes_sd
from attncontrol.training.binding import (
    COLOR_NAMES,
    BindingHead,
    binding_targets,
    linear_probe_accuracy,
    scene_colors,
)
from attncontrol.training.common import LossLog
from tests.training.test_shapes_sd import TINY


def _tokenizer():
    return clip_tokenizer(vocab_size=49408, max_length=77)


def test_targets_point_at_each_shape_word_with_its_objects_colour():
    tokenizer = _tokenizer()
    captions = [
        "a blue square on the left and a red circle on the right",
        "a green triangle and a green triangle",
        "a red circle, a blue circle and a yellow square",
    ]
    objects = [
        [("red", "circle"), ("blue", "square")],
        [("green", "triangle"), ("green", "triangle")],
        [("red", "circle"), ("blue", "circle"), ("yellow", "square")],
    ]
    targets = binding_targets(captions, objects, tokenizer)
    for row, caption in enumerate(captions):
        words = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        named = sorted(
            (words[int(p)], COLOR_NAMES[int(c)], words[int(p) - 1])
            for p, c in zip(targets.positions[row], targets.labels[row], strict=True)
            if c != -100
        )
        # Every shape word is paired with the colour written right before it, and nothing else is.
        assert all(colour + "</w>" == before for _, colour, before in named)
        assert len(named) == len(objects[row])
    assert int((targets.labels[1] != -100).sum()) == 2  # both occurrences of the repeated phrase


def test_pool_scenes_bind_every_object():
    scenes = SceneGenerator(3).batch(0, 60)
    targets = binding_targets([s.caption for s in scenes], [scene_colors(s) for s in scenes], _tokenizer())
    assert [int((row != -100).sum()) for row in targets.labels] == [len(s.objects) for s in scenes]


def test_head_loss_trains_the_states_it_reads_and_ignores_unused_slots():
    tokenizer = _tokenizer()
    targets = binding_targets(["a red circle and a blue square"], [[("red", "circle"), ("blue", "square")]], tokenizer)
    torch.manual_seed(0)
    states = torch.randn(1, 77, 16, requires_grad=True)
    head = BindingHead(16)
    loss, accuracy = head(states, targets)
    loss.backward()
    touched = states.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert touched == sorted(int(p) for p, c in zip(targets.positions[0], targets.labels[0], strict=True) if c != -100)
    assert 0.0 <= float(accuracy) <= 1.0

    # A head that reads the colour off perfectly drives the loss towards zero.
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        for position, label in zip(targets.positions[0][:2], targets.labels[0][:2], strict=True):
            states[0, position] = 0.0
            states[0, position, int(label)] = 100.0
        head.proj.weight[:, :4] = torch.eye(4)
    loss, accuracy = head(states, targets)
    assert float(loss.detach()) < 1e-6 and float(accuracy) == 1.0

    dropped = targets[torch.tensor([0])]
    dropped.labels[:] = -100
    loss, _ = head(states, dropped)
    assert float(loss.detach()) == 0.0


def test_linear_probe_reads_separable_labels_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(72) % 4
    separable = torch.randn(72, 64, generator=generator) * 0.1
    separable[torch.arange(72), labels] += 3.0
    assert linear_probe_accuracy(separable, labels) >= 0.95
    noise = torch.randn(72, 64, generator=generator)
    assert linear_probe_accuracy(noise, labels) < 0.6


def test_loss_log_keeps_named_terms_with_gaps():
    log = LossLog()
    log.add({"diffusion": 1.0})
    log.add({"diffusion": 0.5, "binding": 0.2, "binding_accuracy": 0.75})
    final = log.final()
    assert final["final_loss"] == pytest.approx(0.75)
    assert final["final_binding_loss"] == pytest.approx(0.2) and final["final_binding_accuracy"] == 0.75
    assert final["final_grounding_loss"] is None  # named even when the run never had it
    assert log.probe_entry(2, 0.1, 0.5)["binding_loss"] == pytest.approx(0.2)


def test_bf16_training_with_binding_resumes_with_its_head(tmp_path):
    out = tmp_path / "run"
    flags = ["--binding-weight", "0.5", "--mixed-precision", "bf16", *TINY]
    shapes_sd.main(["--out", str(out), "--unet-steps", "4", *flags])
    first = torch.load(out / "checkpoint-unet.pt", weights_only=False)
    assert set(first["binding_head"]) == {"proj.weight", "proj.bias"}
    shapes_sd.main(["--out", str(out), "--unet-steps", "6", "--resume", *flags])
    metrics = json.loads((out / "unet_metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["final_binding_loss"] > 0
    second = torch.load(out / "checkpoint-unet.pt", weights_only=False)
    assert not torch.equal(first["binding_head"]["proj.weight"], second["binding_head"]["proj.weight"])
    # The head shapes training only: the exported pipeline is a plain StableDiffusionPipeline.
    assert not list((out / "pipeline").glob("*binding*"))
    with pytest.raises(ValueError, match="mixed_precision"):
        shapes_sd.main(["--out", str(tmp_path / "bad"), "--unet-steps", "1", "--mixed-precision", "fp8", *TINY])
