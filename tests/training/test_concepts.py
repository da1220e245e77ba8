"""Concept extraction: the losses, masks from attention, input errors, and the training script's files (they load
into a fresh stock pipeline and reproduce the trained one; a resumed run continues where it stopped)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from attncontrol.concepts import (
    attention_masks,
    concept_prompt,
    cross_attention_loss,
    load_concepts,
    mask_ssim,
    masked_diffusion_loss,
    prepare_concepts,
    unload_concepts,
)
from attncontrol.core.errors import ConceptError
from attncontrol.shapes.scenes import ObjectSpec, render
from attncontrol.training.concepts import Config, check_config, recipe_config, train_concepts


def _blobs(size: int = 16) -> torch.Tensor:
    masks = torch.zeros(2, size, size)
    masks[0, 2:7, 2:8] = 1
    masks[1, 9:14, 8:15] = 1
    return masks


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("kind", ["mse", "jsd"])
def test_attention_loss_is_zero_when_maps_equal_masks_and_differentiable(kind):
    masks = _blobs()
    assert float(cross_attention_loss(masks.clone(), masks, kind=kind)) == pytest.approx(0.0, abs=1e-7)
    # maps that are the masks at another scale are the same maps once normalized
    assert float(cross_attention_loss(0.03 * masks, masks, kind=kind)) == pytest.approx(0.0, abs=1e-7)

    maps = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_(True)
    loss = cross_attention_loss(maps, masks, kind=kind)
    assert loss.item() > 0
    loss.backward()
    assert maps.grad is not None and float(maps.grad.abs().sum()) > 0
    # gradient descent on the maps moves them towards the masks
    with torch.no_grad():
        stepped = maps - 0.5 * maps.grad / maps.grad.abs().max()
    assert float(cross_attention_loss(stepped, masks, kind=kind)) < loss.item()


def test_masked_diffusion_loss_ignores_what_the_mask_leaves_out():
    prediction = torch.zeros(1, 4, 8, 8)
    target = torch.zeros(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    target[..., 4:, :] = 5.0  # wrong only outside the mask
    assert float(masked_diffusion_loss(prediction, target, mask)) == 0.0
    target[..., 0, 0] = 2.0
    assert float(masked_diffusion_loss(prediction, target, mask)) == pytest.approx(4 * 4.0 / target.numel())
    # AttenCraft's mean over the masked elements: the same error, counted against the 4 x 32 masked elements only
    assert float(masked_diffusion_loss(prediction, target, mask, mean_over="mask")) == pytest.approx(16.0 / 128)
    # per sample: one value per batch row over its own mask (row 1 right everywhere, row 2 masked on a quarter)
    batch = (torch.cat([prediction, prediction, prediction]), torch.cat([target, torch.zeros_like(target), target]))
    masks = torch.cat([mask, mask, mask * (torch.arange(8) < 2).float()])
    per_row = masked_diffusion_loss(*batch, masks, mean_over="mask", per_sample=True)
    torch.testing.assert_close(per_row, torch.tensor([16.0 / 128, 0.0, 16.0 / 32]))
    per_row = masked_diffusion_loss(*batch, masks, per_sample=True)
    torch.testing.assert_close(per_row, torch.tensor([16.0 / 256, 0.0, 16.0 / 256]))


# ------------------------------------------------------------------------------------------------ masks from attention
def test_attention_masks_recover_objects_from_coarse_maps_and_affinity():
    size = 16
    masks = _blobs(size)
    background = 1 - masks.amax(0)
    # coarse, blurry cross maps: each token peaks near its object's centre but leaks everywhere
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cross = torch.stack(
        [torch.exp(-((ys - 4) ** 2 + (xs - 5) ** 2) / 12), torch.exp(-((ys - 11) ** 2 + (xs - 11) ** 2) / 12)]
    )
    cross = cross + 0.05
    # self-attention: every pixel attends within its own region (object 0, object 1 or background)
    labels = (masks[0] + 2 * masks[1]).flatten()
    affinity = (labels[:, None] == labels[None, :]).float()
    affinity = affinity / affinity.sum(-1, keepdim=True)
    for method in ("cluster", "propagate"):
        found = attention_masks(cross, affinity, method=method, background=background * 0.5 + 0.05, threshold=0.1)
        assert found.shape == (2, size, size)
        for index in range(2):
            truth = masks[index].bool()
            iou = (found[index] & truth).sum() / (found[index] | truth).sum()
            assert float(iou) > 0.9, (method, index)
    # the tokens swapped: the clusters follow the tokens
    swapped = attention_masks(cross.flip(0), affinity)
    assert torch.equal(swapped[0], masks[1].bool()) and torch.equal(swapped[1], masks[0].bool())


def test_attention_masks_more_groups_keep_a_split_object_whole():
    """Self-attention with five regions: object 0, object 1's rim and inside, two background halves. With N + 1 = 3
    groups k-means must merge regions and object 1 loses its rim; with more groups each extra group goes to the
    token that attends to it more than on average (the rim) or stays background (the second half)."""
    size = 16
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    square = (ys >= 2) & (ys <= 6) & (xs >= 2) & (xs <= 6)
    distance = ((ys - 11) ** 2 + (xs - 11) ** 2).sqrt()
    disc, inside = distance <= 4.2, distance <= 2.5
    regions = (xs >= 8).long()  # background: left half 0, right half 1
    regions[square], regions[disc & ~inside], regions[inside] = 2, 3, 4
    cross = torch.stack(
        [torch.exp(-((ys - 4) ** 2 + (xs - 4) ** 2) / 6), torch.exp(-((ys - 11) ** 2 + (xs - 11) ** 2) / 6)]
    )
    cross = cross + 0.05
    labels = regions.flatten()
    affinity = (labels[:, None] == labels[None, :]).float()
    affinity = affinity / affinity.sum(-1, keepdim=True)

    def ious(found: torch.Tensor) -> list[float]:
        return [float((f & m).sum() / (f | m).sum()) for f, m in zip(found, (square, disc), strict=True)]

    assert ious(attention_masks(cross, affinity, groups=3))[1] < 0.5  # the rim is lost to the background
    for groups in (0, 4, 5, 6):  # 0: N + 2
        assert ious(attention_masks(cross, affinity, groups=groups)) == [1.0, 1.0], groups
    with pytest.raises(ValueError, match="groups"):
        attention_masks(cross, affinity, groups=2)
    # a speck that token 1 also attends to: its own group goes to token 1, unless pieces that small are dropped
    speck = torch.zeros(size, size, dtype=torch.bool)
    speck[1, 13:15] = True
    regions[speck] = 5
    labels = regions.flatten()
    affinity = (labels[:, None] == labels[None, :]).float()
    affinity = affinity / affinity.sum(-1, keepdim=True)
    cross[1][speck] = 1.0
    found = attention_masks(cross, affinity, groups=6, min_piece=0)
    assert torch.equal(found[1], disc | speck) and torch.equal(found[0], square)
    found = attention_masks(cross, affinity, groups=6)  # pieces under 0.25 of the largest are dropped
    assert torch.equal(found[1], disc) and torch.equal(found[0], square)


def test_attention_masks_give_an_edge_to_the_object_it_borders():
    """Self-attention with four regions: object 0, object 1's inside, object 1's top and left edge (an L) and the
    background. Token 0 attends to the L more than token 1 does (as on the shapes model, where a yellow circle's
    token took a green square's edge), so the ratio rule alone gives the L to token 0; it borders only object 1."""
    size = 16
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    first = (ys >= 1) & (ys <= 4) & (xs >= 1) & (xs <= 4)
    edge = ((ys == 6) & (xs >= 8) & (xs <= 14)) | ((xs == 8) & (ys >= 6) & (ys <= 12))
    inside = (ys >= 7) & (ys <= 12) & (xs >= 9) & (xs <= 14)
    regions = torch.zeros(size, size, dtype=torch.long)
    regions[first], regions[inside], regions[edge] = 1, 2, 3
    labels = regions.flatten()
    affinity = (labels[:, None] == labels[None, :]).float()
    affinity = affinity / affinity.sum(-1, keepdim=True)
    cross = torch.stack([0.05 + first.float() + 0.5 * edge.float(), 0.05 + inside.float()])
    ratios = [float(c[edge].mean() / c.mean()) for c in cross]
    assert ratios[0] > 1 > ratios[1]  # what made the ratio rule give the edge to token 0
    found = attention_masks(cross, affinity)
    assert torch.equal(found[0], first) and torch.equal(found[1], inside | edge)


def test_mask_ssim_prefers_similar_masks():
    masks = _blobs()
    assert mask_ssim(masks[0], masks[0]) == pytest.approx(1.0, abs=1e-6)
    shifted = torch.roll(masks[0], 1, dims=1)
    assert mask_ssim(masks[0], masks[1]) < mask_ssim(masks[0], shifted) < 1.0


def test_attention_masks_find_the_objects_of_a_shapes_scene(tmp_path):
    """On the trained shapes model, AttenCraft's masks land on the two objects (IoU with the drawn masks)."""
    from attncontrol.training.concepts import ConceptTrainer

    scene = render([ObjectSpec("red", "circle", 18, 20, 10), ObjectSpec("blue", "square", 44, 44, 10)])
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    config = Config(
        out=str(tmp_path / "run"),
        image=str(tmp_path / "scene.png"),
        mask_source="attention",
        num_concepts=2,
        initializers=["circle", "square"],
        phase2_steps=0,
    )
    from accelerate import Accelerator

    trainer = ConceptTrainer(config, Accelerator())
    trainer.refresh_masks()
    assert trainer.mask_log[-1]["accepted"]
    for index, obj in enumerate(scene.objects):
        found = trainer.masks[index].bool().numpy()
        iou = (found & obj.mask).sum() / (found | obj.mask).sum()
        assert iou > 0.5, (index, iou)
    saved = sorted(p.name for p in (tmp_path / "run" / "masks").iterdir())
    assert saved == ["step-00000-asset0.png", "step-00000-asset1.png"]


# ------------------------------------------------------------------------------------------------ bad input
def _scene_files(folder, size=32):
    scene = render(
        [
            ObjectSpec("red", "circle", size * 0.3, size * 0.3, 5),
            ObjectSpec("blue", "square", size * 0.7, size * 0.7, 5),
        ],
        size=size,
    )
    Image.fromarray(scene.image).save(folder / "scene.png")
    paths = []
    for index, obj in enumerate(scene.objects):
        path = folder / f"mask{index}.png"
        Image.fromarray((obj.mask * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return folder / "scene.png", paths


def test_bad_inputs_fail_before_training(tmp_path):
    from attncontrol.testing import clip_tokenizer

    image, masks = _scene_files(tmp_path)
    tokenizers = [clip_tokenizer()]
    with pytest.raises(ConceptError, match="3 `tokens` but 2 `masks`"):
        prepare_concepts(image, masks, ["<a>", "<b>", "<c>"], size=(32, 32), tokenizers=tokenizers)
    with pytest.raises(ConceptError, match="overlap completely"):
        prepare_concepts(image, [masks[0], masks[0]], None, size=(32, 32), tokenizers=tokenizers)
    with pytest.raises(ConceptError, match="`image` is 32x32"):
        prepare_concepts(image, masks, None, size=(64, 64), tokenizers=tokenizers)
    with pytest.raises(ConceptError, match="'circle' is already in the tokenizer"):
        prepare_concepts(image, masks, ["circle", "<b>"], size=(32, 32), tokenizers=tokenizers)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(empty)
    with pytest.raises(ConceptError, match="empty"):
        prepare_concepts(image, [masks[0], str(empty)], None, size=(32, 32), tokenizers=tokenizers)
    inputs = prepare_concepts(image, masks, None, size=(32, 32), tokenizers=tokenizers)
    assert inputs.tokens == ["<asset0>", "<asset1>"] and inputs.masks.shape == (2, 32, 32)

    with pytest.raises(ConceptError, match="--mask-source"):
        check_config(Config(image=str(image), mask_source="magic"))
    with pytest.raises(ConceptError, match="needs `--masks`"):
        check_config(Config(image=str(image)))
    with pytest.raises(ConceptError, match="--template"):
        check_config(Config(image=str(image), masks=masks, template="a photo"))
    with pytest.raises(ConceptError, match="`--model` 'tiny-flux' is a FluxPipeline"):
        train_concepts(Config(model="tiny-flux", image=str(image), masks=masks, out=str(tmp_path / "flux")))
    for name, value in (
        ("loss_guidance", -1.0),
        ("loss_guidance", float("nan")),
        ("max_timestep", -5),
        ("pixel_weight", -0.5),
        ("pixel_weight", float("nan")),
        ("init_search", -1),
        ("mask_groups", -1),
        ("mask_groups", 2),  # two masks: 0 or at least 3 groups
        ("mask_min_piece", 1.5),
    ):
        with pytest.raises(ConceptError, match=f"--{name.replace('_', '-')}"):
            check_config(Config(image=str(image), masks=masks, **{name: value}))


# ------------------------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from attncontrol.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models")
    tiny_sd_pipeline().save_pretrained(folder / "sd")
    tiny_sdxl_pipeline().save_pretrained(folder / "sdxl")
    return folder


def _config(tmp_path, model, **changes) -> Config:
    image, masks = _scene_files(tmp_path)
    config = Config(
        out=str(tmp_path / "run"),
        model=str(model),
        image=str(image),
        masks=masks,
        initializers=["circle", "square"],
        phase1_steps=2,
        phase2_steps=2,
        phase1_lr=1e-2,
        phase2_lr=1e-2,
        phase2_embedding_lr=1e-2,
        checkpoint_every=1,
        validation_seeds=0,
        train_text_encoder=True,
    )
    return replace(config, **changes)


def _generate(pipe, prompt):
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


@pytest.mark.parametrize(("family", "vectors"), [("sd", 1), ("sdxl", 2)])
def test_trained_files_reload_in_a_fresh_pipeline(tiny_models, tmp_path, family, vectors):
    from diffusers import DiffusionPipeline

    config = _config(tmp_path, tiny_models / family, validation_seeds=1, validation_steps=2, num_vectors=vectors)
    trained = train_concepts(config)
    out = trained.out
    manifest = json.loads((out / "concepts.json").read_text())
    assert manifest["tokens"] == ["<asset0>", "<asset1>"] and manifest["lora"]
    assert (out / "validation" / "final.png").exists()
    prompt = concept_prompt(trained.tokens)
    expected = _generate(trained.pipeline, prompt)

    fresh = DiffusionPipeline.from_pretrained(tiny_models / family)
    fresh.set_progress_bar_config(disable=True)
    before = _generate(fresh, "a red circle")
    tokens = load_concepts(fresh, out)
    assert tokens == trained.tokens
    if vectors > 1:  # diffusers expands a multi-vector token in prompts
        assert fresh.maybe_convert_prompt("a <asset0>", fresh.tokenizer) == "a <asset0> <asset0>_1"
    actual = _generate(fresh, prompt)
    assert np.abs(actual - expected).max() <= 1e-5
    # the LoRA changed the model (so the comparison above is not vacuous), and unloading takes it out again
    assert np.abs(_generate(fresh, "a red circle") - before).max() > 1e-4
    unload_concepts(fresh, tokens)
    assert np.abs(_generate(fresh, "a red circle") - before).max() <= 1e-6


def test_resume_continues_at_the_saved_step(tiny_models, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = train_concepts(_config(tmp_path / "a", tiny_models / "sd"))
    first = train_concepts(_config(tmp_path / "b", tiny_models / "sd", phase2_steps=1))
    assert first.metrics["steps"] == 3
    resumed = train_concepts(_config(tmp_path / "b", tiny_models / "sd"), resume=True)
    assert [entry["step"] for entry in resumed.metrics["history"]] == [1, 2, 3, 4]
    for name in ("unet", "text_encoder"):
        a = dict(getattr(straight.pipeline, name).named_parameters())
        b = dict(getattr(resumed.pipeline, name).named_parameters())
        trained_names = [n for n in a if "lora_" in n or "token_embedding" in n]
        assert trained_names
        for key in trained_names:
            assert torch.equal(a[key], b[key]), key


def test_attention_loss_moves_token_maps_towards_masks(tiny_models, tmp_path):
    """Training the embeddings on the attention loss alone lowers it on a fixed batch: the gradient reaches the
    tokens through the stored attention maps."""
    from accelerate import Accelerator

    from attncontrol.core.store import AttentionStore
    from attncontrol.training.concepts import ConceptTrainer

    config = _config(tmp_path, tiny_models / "sd", phase1_steps=8, phase2_steps=0, masked_loss=True, phase1_lr=5e-2)
    config = replace(config, attention_weight=1.0, checkpoint_every=100)
    trainer = ConceptTrainer(config, Accelerator())
    fixed = {
        "subset": [0, 1],
        "flip": False,
        "prior": None,
        "noise": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)),
        "timesteps": torch.tensor([500]),
    }
    store = AttentionStore(kinds="cross", keep_grad=True, layers="cross")

    def attention_loss() -> float:
        with torch.no_grad(), trainer.observed(store):
            return float(trainer.losses(store, fixed)["attention"])

    before = attention_loss()
    trainer.run()
    assert attention_loss() < 0.9 * before


def test_guided_loss_and_timestep_cap(tiny_models, tmp_path):
    """With ``loss_guidance`` w the masked loss is taken on ``uncond + w * (cond - uncond)``, the prediction the
    sampler uses at guidance w; w = 1 is the plain loss; ``loss_guidance_phase2=False`` keeps phase 2 plain.
    ``max_timestep`` bounds the drawn timesteps."""
    from accelerate import Accelerator

    from attncontrol.core.store import AttentionStore
    from attncontrol.training.concepts import ConceptTrainer, _encode

    config = _config(tmp_path, tiny_models / "sd", phase2_steps=0, attention_loss="none", masked_loss_mean="mask")
    trainer = ConceptTrainer(config, Accelerator())
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([600])
    fixed = {"subset": [1], "flip": False, "prior": None, "noise": noise, "timesteps": timesteps}
    store = AttentionStore(kinds="cross", layers="cross")

    def diffusion(scale: float) -> float:
        trainer.config = replace(config, loss_guidance=scale)
        with torch.no_grad(), trainer.observed(store):
            return float(trainer.losses(store, fixed)["diffusion"])

    pipe, clean = trainer.pipe, trainer.latents[0]
    noisy = pipe.scheduler.add_noise(clean, noise, timesteps)
    with torch.no_grad():
        embeds, _ = _encode(pipe, [concept_prompt([trainer.tokens[1]]), ""], trainer.device, trainer.size)
        cond, uncond = pipe.unet(noisy.repeat(2, 1, 1, 1), timesteps.repeat(2), embeds).sample.chunk(2)
    mask = torch.nn.functional.interpolate(trainer.masks[1][None, None], size=clean.shape[-2:], mode="nearest")
    target = noise  # the tiny model predicts epsilon

    def reference(scale: float) -> float:
        return float(masked_diffusion_loss(uncond + scale * (cond - uncond), target, mask, mean_over="mask"))

    assert diffusion(0.0) == pytest.approx(reference(1.0), rel=1e-5)
    assert diffusion(1.0) == pytest.approx(reference(1.0), rel=1e-5)
    assert diffusion(4.0) == pytest.approx(reference(4.0), rel=1e-5)
    assert reference(4.0) != pytest.approx(reference(1.0), rel=1e-3)
    # loss_guidance_phase2=False: phase 1 stays guided, phase 2 fits the plain prediction
    config = replace(config, loss_guidance_phase2=False)
    assert diffusion(4.0) == pytest.approx(reference(4.0), rel=1e-5)
    trainer.phase = 2
    assert diffusion(4.0) == pytest.approx(reference(1.0), rel=1e-5)
    trainer.phase = 1

    trainer.config = replace(config, max_timestep=50)
    drawn = torch.cat([trainer.draw_batch()["timesteps"] for _ in range(40)])
    assert drawn.max() < 50 and drawn.unique().numel() > 10


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_clean_inverts_the_training_target(prediction_type):
    """The clean latent recovered from a perfect prediction is the one that was noised, for either prediction type."""
    from diffusers import DDPMScheduler

    from attncontrol.training.concepts import _predicted_clean, _target

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([5, 500, 990])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    recovered = _predicted_clean(scheduler, noisy, _target(scheduler, clean, noise, timesteps), timesteps)
    torch.testing.assert_close(recovered, clean, atol=2e-4, rtol=1e-4)


def test_pixel_loss_scores_the_decoded_prediction_inside_the_masks(tiny_models, tmp_path):
    """``pixel_weight`` adds the masked squared error of the decoded clean-image prediction: equal to a reference
    built from the UNet and VAE by hand, blind to pixels outside the masks, and added to the loss at its weight."""
    from accelerate import Accelerator

    from attncontrol.core.store import AttentionStore
    from attncontrol.training.concepts import ConceptTrainer, _encode

    config = _config(
        tmp_path, tiny_models / "sd", phase2_steps=0, attention_loss="none", masked_loss_mean="mask", pixel_weight=2.0
    )
    trainer = ConceptTrainer(config, Accelerator())
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([300])
    fixed = {"subset": [1], "flip": False, "prior": None, "noise": noise, "timesteps": timesteps}
    store = AttentionStore(kinds="cross", layers="cross")

    def terms() -> dict[str, float]:
        with torch.no_grad(), trainer.observed(store):
            return {name: float(value) for name, value in trainer.losses(store, fixed).items()}

    pipe, clean = trainer.pipe, trainer.latents[0]
    noisy = pipe.scheduler.add_noise(clean, noise, timesteps)
    with torch.no_grad():
        embeds, _ = _encode(pipe, [concept_prompt([trainer.tokens[1]])], trainer.device, trainer.size)
        epsilon = pipe.unet(noisy, timesteps, embeds).sample
        alpha = pipe.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        guess = (noisy - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        decoded = pipe.vae.decode(guess / pipe.vae.config.scaling_factor).sample
    mask = trainer.masks[1]
    reference = float(((decoded[0] - trainer.inputs.pixels) ** 2 * mask).sum() / (3 * mask.sum()))

    first = terms()
    assert first["pixel"] == pytest.approx(reference, rel=1e-4)
    assert first["loss"] == pytest.approx(first["diffusion"] + 2.0 * first["pixel"], rel=1e-5)
    original = trainer.inputs.pixels.clone()
    trainer.inputs.pixels[:, mask == 0] = -original[:, mask == 0]
    assert terms()["pixel"] == pytest.approx(first["pixel"], rel=1e-6)
    trainer.inputs.pixels[:, mask == 1] = 1.0 - original[:, mask == 1]
    assert terms()["pixel"] != pytest.approx(first["pixel"], rel=1e-2)


def test_initializer_search_starts_from_the_best_scoring_word(tiny_models, tmp_path):
    """``init_search``: each vector starts from the candidate word with the lowest masked loss on fixed draws (or
    keeps its initializer if none is lower); with more candidates than ``init_search`` only that many, ranked by the
    loss's gradient, are scored; the search leaves no gradients behind."""
    from accelerate import Accelerator

    from attncontrol.training.concepts import ConceptTrainer

    words = ["red", "blue", "green", "circle", "square"]
    config = _config(tmp_path, tiny_models / "sd", num_vectors=1, init_search=8, init_search_rounds=1, init_words=words)
    trainer = ConceptTrainer(config, Accelerator())
    tokenizer, table = trainer.pipe.tokenizer, trainer.embeddings[0].table.weight
    fixed = [trainer._search_draws(concept) for concept in range(2)]
    # seeded by the config, not the process's stream: every accelerate process scores the same draws
    torch.testing.assert_close(trainer._search_draws(1)["noisy"], fixed[1]["noisy"])
    trainer._search_draws = lambda concept: fixed[concept]

    def loss_with(concept: int, row: torch.Tensor) -> float:
        saved = trainer.rows[0][concept].detach().clone()
        with torch.no_grad():
            trainer.rows[0][concept] = row
            value = float(trainer._search_loss(concept, fixed[concept]))
            trainer.rows[0][concept] = saved
        return value

    expected = []
    for concept in range(2):
        losses = {word: loss_with(concept, table[tokenizer(word).input_ids[1]]) for word in words}
        start = loss_with(concept, trainer.rows[0][concept].detach())
        best = min(losses, key=losses.get)
        expected.append(best if losses[best] < start else "(initializer)")
    trainer.search_initializers()
    assert [entry["words"] for entry in trainer.initializer_search] == [[word] for word in expected]
    for concept, word in enumerate(expected):
        if word != "(initializer)":
            torch.testing.assert_close(trainer.rows[0][concept].detach(), table[tokenizer(word).input_ids[1]])
    assert all(p.grad is None for p in trainer.pipe.unet.parameters())

    scored = []
    trainer.config = replace(config, init_search=2)
    original = trainer._search_loss
    trainer._search_loss = lambda concept, draws: scored.append(concept) or original(concept, draws)
    trainer.search_initializers()
    assert len(scored) == 2 * (1 + 1 + 2)  # per concept: the start, the gradient, two candidates

    with pytest.raises(ConceptError, match="init-words"):
        ConceptTrainer(replace(config, init_words=["notaword"]), Accelerator()).search_initializers()


def test_search_score_is_each_draws_masked_loss_relative_to_the_empty_prompt(tiny_models, tmp_path):
    """The search scores a token by the mean over draws of (its masked loss / the empty prompt's masked loss on the
    same draw), so noisy high-timestep draws do not outweigh the rest; elements outside the mask do not count."""
    from accelerate import Accelerator

    from attncontrol.training.concepts import ConceptTrainer

    config = _config(tmp_path, tiny_models / "sd", num_vectors=1, init_search=2, init_search_draws=3)
    trainer = ConceptTrainer(config, Accelerator())
    pipe = trainer.pipe
    draws = trainer._search_draws(1)

    def masked_per_draw(prompt: str, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt([prompt] * 3, "cpu", 1, False)
            prediction = pipe.unet(draws["noisy"], draws["timesteps"], embeds).sample
        mask = draws["masks"]
        return (((prediction - target) * mask) ** 2).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * prediction.shape[1])

    prompt = config.template.format(trainer.tokens[1])
    reference = (masked_per_draw(prompt, draws["target"]) / masked_per_draw("", draws["target"])).mean()
    with torch.no_grad():
        score = trainer._search_loss(1, draws)
    assert float(score) == pytest.approx(float(reference), rel=1e-4)
    plain = masked_per_draw(prompt, draws["target"]).mean()
    assert float(score) != pytest.approx(float(plain), rel=1e-2)  # not the plain mean

    outside = draws["masks"] == 0
    changed = dict(draws, target=torch.where(outside, draws["target"] + 5.0, draws["target"]))
    with torch.no_grad():
        assert float(trainer._search_loss(1, changed)) == pytest.approx(float(score), rel=1e-5)


def test_two_processes_train_in_step(tiny_models, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): gradients are averaged across processes, so both end with
    the same weights although each draws its own noise; the main process exports."""
    import os
    import subprocess
    import sys

    image, masks = _scene_files(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ATTNCONTROL_DUMP_ROWS": str(tmp_path)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
        "-m", "attncontrol.training.concepts", "--model", str(tiny_models / "sd"), "--image", str(image),
        "--masks", *masks, "--initializers", "circle", "square", "--phase1-steps", "2", "--phase2-steps", "2",
        "--validation-seeds", "0", "--out", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((out / "concepts.json").read_text())["steps"] == 4
    rows = [torch.load(tmp_path / f"rows-{rank}.pt") for rank in range(2)]
    assert torch.equal(rows[0], rows[1])


def test_latest_mask_images_are_the_last_saved_set(tmp_path):
    from attncontrol.concepts import latest_mask_images, save_mask_images

    assert latest_mask_images(tmp_path) == []
    masks = _blobs().bool()
    for step in (0, 20, 100):
        save_mask_images(masks, ["<asset0>", "<asset1>"], tmp_path, (16, 16), f"step-{step:05d}")
    assert [p.name for p in latest_mask_images(tmp_path)] == ["step-00100-asset0.png", "step-00100-asset1.png"]


def test_recipe_sets_the_defaults_and_explicit_flags_win(monkeypatch):
    from attncontrol.training import concepts as trainer

    seen = []
    monkeypatch.setattr(trainer, "train_concepts", lambda config, resume=False: seen.append(config))
    trainer.main(["--image", "x.png", "--recipe", "guided-embeddings", "--num-vectors", "3"])
    trainer.main(["--image", "x.png"])
    guided, paper = seen
    assert (guided.loss_guidance, guided.phase2_steps, guided.sampling) == (5.0, 0, "attencraft")
    assert guided.init_search == 32
    assert guided.num_vectors == 3  # the explicit flag, not the recipe's 2
    assert recipe_config("guided-embeddings", image="x.png") == replace(guided, num_vectors=2)
    assert paper == Config(image="x.png") == recipe_config("break-a-scene", image="x.png")
    with pytest.raises(ConceptError, match="--recipe"):
        recipe_config("fast")
    with pytest.raises(SystemExit):
        trainer.main(["--image", "x.png", "--recipe", "fast"])
