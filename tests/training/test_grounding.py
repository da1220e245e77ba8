"""The token grounding loss finds each object's words, scores where their attention falls, and trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attncontrol.shapes import SceneGenerator
from attncontrol.shapes.scenes import ObjectSpec, render
from attncontrol.testing.tiny import clip_tokenizer
from attncontrol.training import shapes_sd
from attncontrol.training.grounding import grounding_loss, grounding_targets, scene_objects
from tests.training.test_shapes_sd import TINY


def _tokenizer():
    return clip_tokenizer(vocab_size=49408, max_length=77)


def test_targets_pair_every_colour_and_shape_word_with_its_object():
    scene = render([ObjectSpec("red", "circle", 16, 20, 8), ObjectSpec("blue", "square", 46, 40, 9)])
    scene.caption = "a blue square on the left and a red circle on the right"  # order differs from the specs
    tokenizer = _tokenizer()
    targets = grounding_targets([scene.caption], [scene_objects(scene, 16)], tokenizer, 16)
    words = tokenizer.convert_ids_to_tokens(tokenizer(scene.caption).input_ids)
    grounded = [words[int(p)] for p in targets.positions[0][targets.valid[0]]]
    assert grounded == ["red</w>", "circle</w>", "blue</w>", "square</w>"]
    for slot, obj in zip((0, 2), scene.objects, strict=True):
        cells = targets.masks[0, slot].float()
        assert float(cells.sum()) * 16 == pytest.approx(obj.area, rel=1e-3)  # 4x4 pixels per cell
        assert float(cells[targets.masks[0, slot].float().argmax()]) == 1.0
    torch.testing.assert_close(targets.masks[0, 0], targets.masks[0, 1])


def test_identical_objects_share_one_union_mask():
    scene = render([ObjectSpec("green", "triangle", 14, 14, 8), ObjectSpec("green", "triangle", 48, 48, 8)])
    scene.caption = "a green triangle and a green triangle"
    targets = grounding_targets([scene.caption], [scene_objects(scene, 16)], _tokenizer(), 16)
    assert int(targets.valid.sum()) == 4
    union = np.any([obj.mask for obj in scene.objects], axis=0)
    assert float(targets.masks[0, 0].float().sum()) * 16 == pytest.approx(float(union.sum()), rel=1e-3)


def _record(probs: torch.Tensor, side: int):
    return SimpleNamespace(probs=probs, grid=(side, side))


def test_loss_is_zero_inside_the_object_and_grows_as_attention_leaves_it():
    mask = torch.zeros(16, 16)
    mask[2:8, 4:10] = 1.0  # whole 2x2 blocks, so the 8x8 pooling is exact
    positions = torch.tensor([[4]])
    masks = mask.reshape(1, 1, 256).half()
    valid = torch.tensor([[True]])
    inside = torch.full((1, 256, 10), 1e-3)
    inside[0, :, 4] = mask.reshape(-1)  # word 4 attended only from inside its object
    assert float(grounding_loss([_record(inside, 16)], positions, masks, valid, 16)) == pytest.approx(0.0, abs=1e-6)

    uniform = torch.full((1, 256, 10), 0.1, requires_grad=True)
    loss = grounding_loss([_record(uniform, 16)], positions, masks, valid, 16)
    assert float(loss.detach()) == pytest.approx((1 - 36 / 256) ** 2, rel=1e-4)
    loss.backward()
    assert uniform.grad[0, :, 4].abs().sum() > 0 and uniform.grad[0, :, 5].abs().sum() == 0

    # An 8x8 layer sees the mask area-pooled: the same object, the same share.
    coarse = torch.nn.functional.avg_pool2d(mask[None, None], 2).reshape(1, 64)
    coarse_probs = torch.full((1, 64, 10), 1e-3)
    coarse_probs[0, :, 4] = coarse
    half = grounding_loss([_record(coarse_probs, 8)], positions, masks, valid, 16)
    assert float(half) == pytest.approx(0.0, abs=1e-6)
    assert float(grounding_loss([_record(uniform.detach(), 16)], positions, masks, ~valid, 16)) == 0.0


def test_training_with_grounding_records_the_loss_and_restores_the_processors(tmp_path):
    out = tmp_path / "run"
    # A factor-4 autoencoder with 8 latent channels: the UNet follows its latent, grounding on from the 2nd step.
    factor4 = ["--vae-channels", "16", "16", "16", "--latent-channels", "8"]
    grounded = ["--grounding-weight", "0.1", "--grounding-start", "1"]
    shapes_sd.main(["--out", str(out), "--unet-steps", "3", *grounded, *factor4, *TINY])
    metrics = json.loads((out / "unet_metrics.json").read_text())
    assert 0.0 < metrics["final_grounding_loss"] <= 1.0
    unet_config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["sample_size"]) == (8, 16)

    # Fine-tuning from the exported pipeline starts from its weights (and a mismatched one is refused).
    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    (finetuned / "vae").symlink_to(out / "vae", target_is_directory=True)
    start = ["--out", str(finetuned), "--stage", "unet", "--init-from", str(out / "pipeline")]
    # A grounding loss that starts after the last step never records (nor costs) anything.
    shapes_sd.main([*start, "--unet-steps", "1", "--grounding-weight", "0.1", "--grounding-start", "5", *TINY])
    assert json.loads((finetuned / "unet_metrics.json").read_text())["final_grounding_loss"] is None
    with pytest.raises(ValueError, match="init_from"):
        shapes_sd.main([*start, "--unet-steps", "1", *TINY[:-3], "16", "32", "48"])


def test_pool_scenes_give_targets_for_every_object():
    generator = SceneGenerator(5)
    scenes = generator.batch(0, 40)
    targets = grounding_targets([s.caption for s in scenes], [scene_objects(s, 16) for s in scenes], _tokenizer(), 16)
    for row, scene in enumerate(scenes):
        distinct = {(obj.color, obj.shape) for obj in scene.objects}
        assert int(targets.valid[row].sum()) >= 2 * len(distinct)
