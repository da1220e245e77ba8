"""Region-masked training hides each object's words outside a box around it, with the inference control's rule."""

from __future__ import annotations

import json
from contextlib import ExitStack

import torch

from attncontrol.controls.regions import hard_text_bias, leaked_tokens
from attncontrol.core.control import AttentionControl
from attncontrol.core.masks import resize_to_grid
from attncontrol.core.store import AttentionStore
from attncontrol.shapes.scenes import ObjectSpec, render
from attncontrol.testing.tiny import clip_tokenizer
from attncontrol.training import shapes_sd
from attncontrol.training.common import training_controller
from attncontrol.training.layouts import RegionMaskedTraining, layout_targets, random_regions, scene_boxes
from attncontrol.training.shapes_text import TEXT_HIDDEN
from tests.training.test_shapes_sd import TINY

CAPTION = "a red circle and a blue square"  # tokens: 0 start, 1 a, 2 red, 3 circle, 4 and, 5 a, 6 blue, 7 square, 8 end


def _scene():
    scene = render([ObjectSpec("red", "circle", 14, 16, 8), ObjectSpec("blue", "square", 48, 46, 9)])
    scene.caption = CAPTION
    return scene


def test_the_rule_hides_owned_tokens_outside_and_leaked_tokens_inside():
    inside = torch.tensor([[True, False], [False, True], [False, False]])  # queries in region 0, 1, none
    owners = torch.zeros(10, 2, dtype=torch.bool)
    owners[[2, 3], 0] = owners[[6, 7], 1] = True
    hidden = leaked_tokens([[2, 3], [6, 7]], 10)
    # Inside region 0 everything unowned from "blue" on (end, padding) carries "blue square"; inside region 1
    # everything unowned from "red" on ("and a", end, padding) carries "red circle".
    assert hidden[:, 0].nonzero().squeeze(1).tolist() == [8, 9]
    assert hidden[:, 1].nonzero().squeeze(1).tolist() == [4, 5, 8, 9]
    bias = hard_text_bias(inside, owners, hidden)
    visible = [(row == 0).nonzero().squeeze(1).tolist() for row in bias]
    assert visible == [[0, 1, 2, 3, 4, 5], [0, 1, 6, 7], [0, 1, 4, 5, 8, 9]]
    assert set(bias.unique().tolist()) == {0.0, float("-inf")}
    # Batched: the same rule per leading index.
    torch.testing.assert_close(hard_text_bias(inside[None].repeat(2, 1, 1), owners[None], hidden[None])[1], bias)


def test_targets_and_regions_hold_every_object():
    scene = _scene()
    targets = layout_targets([CAPTION], [scene_boxes(scene)], clip_tokenizer(max_length=77))
    assert targets.valid[0].tolist() == [True, True, False]
    assert targets.tokens[0, 0, :2].tolist() == [2, 3] and targets.tokens[0, 1, :2].tolist() == [6, 7]
    assert (targets.tokens[0, :, 2:] == -1).all() and (targets.tokens[0, 2] == -1).all()
    assert targets.boxes[0, 0].tolist() == list(scene.objects[0].box)
    regions = random_regions(targets.boxes.repeat(50, 1, 1), 24.0, torch.Generator().manual_seed(0))
    box = targets.boxes[0, :2]
    assert (regions[:, :2, :2] <= box[:, :2]).all() and (regions[:, :2, 2:] >= box[:, 2:]).all()
    assert regions.min() >= 0 and regions.max() <= 64 and (regions[:, :2] != box).any()


def _cells_inside(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The inference rule, written out: the cells of ``grid`` at least half covered by the pixel ``box``."""
    x0, y0, x1, y1 = box.tolist()
    centres = torch.arange(64) + 0.5
    plane = ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    return resize_to_grid(plane.float(), grid).reshape(-1) >= 0.5


def _unet():
    torch.manual_seed(0)
    return shapes_sd.build_unet((16, 16, 16), latent_channels=4, sample_size=32).eval()


def test_masked_rows_never_attend_an_object_word_outside_its_region():
    targets = layout_targets([CAPTION] * 2, [scene_boxes(_scene())] * 2, clip_tokenizer(max_length=77))
    masking = RegionMaskedTraining(targets, fraction=1.0, max_margin=8.0, seed=3)
    store = AttentionStore(kinds="cross", keep_grad=True)
    unet = _unet()
    latents, states = torch.randn(2, 4, 32, 32), torch.randn(2, 77, TEXT_HIDDEN)
    with ExitStack() as stack:
        controller = training_controller(stack, unet)
        controller.add(store)
        # Row 1's caption was dropped: only row 0 is masked.
        assert masking.begin_step(controller, 0, torch.tensor([0, 1]), [CAPTION, ""]) == 1
        with torch.no_grad():
            masked = unet(latents, torch.tensor([500, 500]), states).sample
        regions = masking._regions[0]
        records = store.records("cross")
        assert records
        for record in records:
            for slot, tokens in ((0, [2, 3]), (1, [6, 7])):
                inside = _cells_inside(regions[slot], record.grid)
                assert inside.any() and (~inside).any()
                assert record.probs[0][~inside][:, tokens].abs().max() == 0
                assert record.probs[0][inside][:, tokens].min() > 0
                assert record.probs[1][:, tokens].min() > 0
        # The same step draws the same regions (a resumed run matches an uninterrupted one); the next differs.
        masking.begin_step(controller, 0, torch.tensor([0, 1]), [CAPTION, ""])
        torch.testing.assert_close(masking._regions[0], regions)
        masking.begin_step(controller, 1, torch.tensor([0, 1]), [CAPTION, ""])
        assert not torch.equal(masking._regions[0], regions)
        masking.begin_step(controller, 0, torch.tensor([0, 1]), [CAPTION, ""])
        with torch.no_grad():
            again = unet(latents, torch.tensor([500, 500]), states).sample
    torch.testing.assert_close(again, masked)
    with torch.no_grad():
        plain = unet(latents, torch.tensor([500, 500]), states).sample
    torch.testing.assert_close(plain[1], masked[1], atol=1e-5, rtol=1e-5)  # the unmasked row is untouched
    assert (plain[0] - masked[0]).abs().max() > 1e-4


def test_training_with_region_masks_runs_and_exports(tmp_path):
    out = tmp_path / "run"
    shapes_sd.main(["--out", str(out), "--unet-steps", "2", "--region-fraction", "0.5", *TINY])
    assert json.loads((out / "unet_metrics.json").read_text())["steps"] == 2
    assert (out / "pipeline" / "model_index.json").exists()


class _JointProbs(AttentionControl):
    """Every joint-attention call's head-averaged probabilities, with the call's segments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def applies_to_layer(self, layer) -> bool:
        return layer.kind == "joint"

    def wants_probs(self, call) -> bool:
        return True

    def observe(self, call, probs: torch.Tensor) -> None:
        self.calls.append((call.grid, call.query_segments, call.key_segments, probs.detach().mean(1)))


def test_flux_masked_rows_hide_object_words_outside_their_regions_both_ways():
    """Flux's joint attention, as its regional control does at sampling time: image tokens outside a region never
    attend its object's T5 tokens, and those tokens never attend image tokens outside it (dual- and single-stream
    blocks); the row whose caption was dropped is untouched."""
    from attncontrol.core.tokens import token_indices
    from attncontrol.training import shapes_flux

    config = shapes_flux.Config(layers=1, single_layers=1, adaln_zero=False)  # adaLN-Zero outputs zeros at first
    clip, t5, clip_tok, t5_tok = shapes_flux.build_text_encoders(config)
    targets = layout_targets([CAPTION] * 2, [scene_boxes(_scene())] * 2, t5_tok)
    words = [token_indices(t5_tok, CAPTION, phrase, name="phrase") for phrase in ("red circle", "blue square")]
    masking = RegionMaskedTraining(targets, fraction=1.0, max_margin=8.0, text_length=config.max_length, seed=3)
    torch.manual_seed(0)
    transformer = shapes_flux.build_transformer(config, latent_channels=4).eval()
    recorder = _JointProbs()
    packed = torch.randn(2, 64, 16)  # an 8 x 8 token grid
    ids, text_ids = shapes_flux.image_ids(8, 8), torch.zeros(config.max_length, 3)

    def run() -> torch.Tensor:
        with torch.no_grad():
            text = shapes_flux.encode_text(clip, t5, clip_tok, t5_tok, [CAPTION, CAPTION], "cpu")
            return shapes_flux.predict_velocity(transformer, packed, torch.tensor([0.7, 0.7]), text, text_ids, ids)

    with ExitStack() as stack:
        controller = training_controller(stack, transformer)
        controller.add(recorder)
        # Row 1's caption was dropped (for the mask): only row 0 is masked.
        assert masking.begin_step(controller, 0, torch.tensor([0, 1]), [CAPTION, ""]) == 1
        masked = run()
        regions = masking._regions[0]
    plain = run()
    assert {call[1]["text"].stop for call in recorder.calls} == {config.max_length}
    assert len(recorder.calls) == 2  # one dual-stream and one single-stream block
    for grid, query_segments, key_segments, probs in recorder.calls:
        text, image = key_segments["text"], key_segments["image"]
        for slot, tokens in enumerate(words):
            inside = _cells_inside(regions[slot], grid)
            assert inside.any() and (~inside).any()
            image_to_words = probs[0][query_segments["image"]][:, [text.start + t for t in tokens]]
            words_to_image = probs[0][[query_segments["text"].start + t for t in tokens]][:, image]
            assert image_to_words[~inside].abs().max() == 0 and image_to_words[inside].min() > 0
            assert words_to_image[:, ~inside].abs().max() == 0 and words_to_image[:, inside].min() > 0
            assert probs[1][image][:, [text.start + t for t in tokens]].min() > 0
    torch.testing.assert_close(plain[1], masked[1], atol=1e-5, rtol=1e-5)
    assert (plain[0] - masked[0]).abs().max() > 1e-4
