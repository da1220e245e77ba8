"""Learn one new token per object of a single image (Break-A-Scene, with AttenCraft's masks from attention).

    python -m attncontrol.training.concepts --image scene.png --masks m0.png m1.png --initializers circle square \\
        --out runs/concepts                                     # user masks (Break-A-Scene)
    python -m attncontrol.training.concepts --image scene.png --mask-source attention --num-concepts 2 \\
        --initializers circle square --out runs/concepts-auto   # masks from the model's attention (AttenCraft)
    python -m attncontrol.training.concepts ... --resume        # after a stop: continues at the saved step
    accelerate launch -m attncontrol.training.concepts --model stabilityai/stable-diffusion-2-1-base ...
    python -m attncontrol.training.concepts --recipe guided-embeddings ...  # the settings measured best (RECIPES)

Two phases, as in Break-A-Scene. Phase 1 trains only the new tokens' embeddings (the model is frozen; every other
row of the embedding table is put back after each step). Phase 2 adds LoRA adapters to the UNet's attention (and,
with ``--train-text-encoder``, to the text encoder) and trains them with the embeddings; ``--full-finetune`` trains
the whole UNet instead. Each step samples a subset of the tokens ("union sampling": ``"a photo of <asset1> and
<asset0>"``) and adds three losses: the diffusion loss inside the union of their masks, Break-A-Scene's
cross-attention loss tying each token's map to its mask (``--attention-loss mse``, or AttenCraft's ``jsd``), and
optionally a prior-preservation loss on images the model made from ``--prior-prompt``.

Masks: ``--mask-source user`` (one per token), ``attention`` (found from the model's cross- and self-attention at
the start and refreshed every ``--mask-refresh-every`` steps when they stay similar, AttenCraft), or ``both`` (the
attention masks kept inside the user's rough masks). Masks found from attention are saved under ``<out>/masks``.

Writes to ``--out``: ``learned_embeds/<token>.safetensors`` (``pipe.load_textual_inversion``),
``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``), ``concepts.json`` (what
:func:`attncontrol.concepts.load_concepts` reads), validation strips under ``validation/``, ``checkpoint.pt`` every
``--checkpoint-every`` steps and ``metrics.json``. A fully fine-tuned run saves the whole pipeline under ``pipeline/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attncontrol.concepts import (
    LORA_WEIGHTS,
    MANIFEST,
    MASK_METHODS,
    ConceptInputs,
    attention_masks,
    concept_prompt,
    cross_attention_loss,
    mask_ssim,
    masked_diffusion_loss,
    masks_at,
    prepare_concepts,
    safe_name,
    save_mask_images,
)
from attncontrol.core.errors import ConceptError
from attncontrol.core.masks import dilate
from attncontrol.training.common import (
    finish_processes,
    load_checkpoint,
    parse_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
)

logger = logging.getLogger("attncontrol.training.concepts")

MASK_SOURCES = ("user", "attention", "both")
SAMPLINGS = ("union", "attencraft", "single")
ATTENTION_LOSSES = ("mse", "jsd", "none")
LORA_TARGETS_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Config:
    out: str = "runs/concepts"  # output folder: checkpoints, masks, validation strips and the trained concepts
    model: str = "shapes-sd"  # an SD 1.x/2.x or SDXL pipeline: shipped name, local folder or hub id
    image: str = ""  # the one image holding the objects (required)
    masks: list[str] = field(default_factory=list)  # one mask image per token (white: the object)
    tokens: list[str] = field(default_factory=list)  # the new tokens, one per concept; empty: <asset0>, <asset1>, ...
    num_vectors: int = 1  # embedding vectors per token (diffusers' multi-vector textual inversion)
    initializers: list[str] = field(default_factory=list)  # a word or phrase per token; empty: rows of the table
    # "user" (--masks), "attention" (AttenCraft, no masks) or "both" (the attention's masks inside the user's)
    mask_source: str = "user"
    num_concepts: int = 0  # how many concepts, with --mask-source attention and neither masks nor tokens
    template: str = "a photo of {}"  # the training prompt; {} becomes the sampled tokens
    resolution: int = 0  # training image size; 0: the model's own
    seed: int = 0  # seeds the sampling of tokens, timesteps, noise and flips
    phase1_steps: int = 400  # phase 1: only the new token embeddings train
    phase2_steps: int = 400  # phase 2: LoRA (or all weights) and the embeddings; 0 skips it
    phase1_lr: float = 5e-4  # the embeddings' learning rate in phase 1
    phase2_lr: float = 1e-4  # the weights' learning rate in phase 2
    phase2_embedding_lr: float = 1e-4  # the embeddings' learning rate in phase 2
    weight_decay: float = 1e-2  # AdamW's weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    lora_rank: int = 4  # rank (and alpha) of the phase-2 LoRA adapters
    train_text_encoder: bool = False  # phase 2 also adapts the text encoder(s)
    full_finetune: bool = False  # phase 2 trains all UNet weights instead of LoRA
    masked_loss: bool = True  # the diffusion loss only inside the sampled objects' masks (Break-A-Scene)
    masked_loss_mean: str = "image"  # "image": Break-A-Scene's mean over the latent; "mask": over the masked pixels
    max_timestep: int = 0  # > 0: training timesteps are drawn below this; 0: the whole schedule
    loss_guidance: float = 0.0  # > 0: fit the classifier-free-guided prediction at this scale (see `losses`); 0: off
    loss_guidance_phase2: bool = True  # False: phase 2 fits the plain prediction (Break-A-Scene's loss)
    pixel_weight: float = 0.0  # > 0: also score the decoded clean-image prediction in pixels, inside the masks
    init_search: int = 0  # > 0: start each vector from the vocabulary word that best fits its object (see below)
    init_search_draws: int = 32  # (noise, timestep) draws the search scores each candidate on
    init_search_rounds: int = 2  # passes over a token's vectors
    init_search_max_timestep: int = 750  # the search's draws stay below it: above, layout outweighs colour
    init_words: list[str] = field(default_factory=list)  # the search's candidates; empty: every whole word
    attention_loss: str = "mse"  # "mse" (Break-A-Scene), "jsd" or "none": ties each token's map to its mask
    attention_weight: float = 1e-2  # weight of that cross-attention loss
    attention_grid: int = 0  # side of the cross-attention grid the loss uses; 0: the largest <= 16
    sampling: str = "union"  # "union" (Break-A-Scene: a random subset), "single" or "attencraft"
    hflip: bool = True  # flip image and masks at random
    prior_prompt: str = ""  # class prompt of DreamBooth's prior preservation (with --prior-images)
    prior_images: int = 0  # images of --prior-prompt made once by the untouched model; 0: off
    prior_weight: float = 1.0  # weight of the prior-preservation loss
    mask_method: str = "cluster"  # or "propagate" (AttenCraft's margin rule); see attncontrol.concepts
    mask_samples: int = 1  # forward passes (timestep, noise) averaged per mask search
    mask_groups: int = 0  # "cluster": self-attention groups; 0: tokens + 2 (see attncontrol.concepts.attention_masks)
    mask_min_piece: float = 0.25  # drop mask pieces smaller than this fraction of the mask's largest piece
    mask_refresh_every: int = 20  # steps between searches for masks from attention
    mask_threshold: float = 0.1  # "propagate": the margin a class must win by
    mask_ssim: float = 0.8  # a refreshed mask replaces the last only if at least this similar (SSIM)
    mask_max_timestep: int = 300  # mask searches draw their timestep below this
    gradient_accumulation_steps: int = 1  # steps whose gradients add up before each update
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate's mixed precision)
    checkpoint_every: int = 100  # steps between checkpoints (--resume continues from the last one)
    validation_every: int = 0  # 0: only after training
    validation_seeds: int = 2  # seeds per validation strip (each token alone, then all)
    validation_steps: int = 25  # sampling steps of the validation and prior images
    guidance_scale: float = 0.0  # 0: the pipeline's default
    minutes: float = 0.0  # a wall-clock cap; 0: none

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps


#: Named sets of settings (``--recipe``, the app's recipe choice); flags given explicitly win over them.
#: ``break-a-scene``: the paper's two phases, the defaults above. ``guided-embeddings``: the settings measured best on
#: the shipped shapes model (docs/concepts.md, "Measured on the shapes world"): embeddings only, two vectors per
#: token, the guided loss, a weaker attention loss, the starting-word search and AttenCraft's sampling.
RECIPES: dict[str, dict[str, Any]] = {
    "break-a-scene": {},
    "guided-embeddings": {
        "phase2_steps": 0,
        "num_vectors": 2,
        "attention_weight": 0.1,
        "masked_loss_mean": "mask",
        "loss_guidance": 5.0,
        "init_search": 32,
        "sampling": "attencraft",
    },
}


def recipe_config(recipe: str = "break-a-scene", **settings: Any) -> Config:
    """A :class:`Config` from a named recipe, ``settings`` overriding it (``recipe_config("guided-embeddings",
    image="scene.png", masks=[...])``)."""
    if recipe not in RECIPES:
        raise ConceptError(f"`--recipe` must be one of {list(RECIPES)}, got {recipe!r}")
    return Config(**{**RECIPES[recipe], **settings})


@dataclass
class TrainedConcepts:
    """What :func:`train_concepts` returns: the trained in-memory pipeline, its tokens, the output folder, metrics."""

    pipeline: Any
    tokens: list[str]
    out: Path
    metrics: dict


def check_config(config: Config) -> None:
    """Refuse settings that cannot train, before any model is loaded."""
    choices = {
        "mask_source": MASK_SOURCES,
        "sampling": SAMPLINGS,
        "attention_loss": ATTENTION_LOSSES,
        "mask_method": MASK_METHODS,
        "masked_loss_mean": ("image", "mask"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConceptError(f"`--{name.replace('_', '-')}` must be one of {allowed}, got {getattr(config, name)!r}")
    if not config.image:
        raise ConceptError("`--image` is required: the one image holding the concepts")
    if config.mask_source in ("user", "both") and not config.masks:
        raise ConceptError(f"`--mask-source {config.mask_source}` needs `--masks` (one per token)")
    if config.mask_source == "attention" and config.masks:
        raise ConceptError("`--masks` were given with `--mask-source attention`; use `both` to refine them")
    if "{}" not in config.template:
        raise ConceptError(f"`--template` must contain '{{}}' where the tokens go, got {config.template!r}")
    if config.phase1_steps < 0 or config.phase2_steps < 0 or config.total_steps == 0:
        raise ConceptError("`--phase1-steps` and `--phase2-steps` must be >= 0 and not both 0")
    if config.lora_rank <= 0 and config.phase2_steps and not config.full_finetune:
        raise ConceptError(f"`--lora-rank` must be positive, got {config.lora_rank}")
    if not 1 <= config.num_vectors <= 16:
        raise ConceptError(f"`--num-vectors` must be between 1 and 16, got {config.num_vectors}")
    if config.gradient_accumulation_steps < 1:
        raise ConceptError("`--gradient-accumulation-steps` must be >= 1")
    if config.prior_images and not config.prior_prompt:
        raise ConceptError("`--prior-images` needs `--prior-prompt` (the class prompt, e.g. 'a photo at the beach')")
    if not config.loss_guidance >= 0:  # also refuses NaN
        raise ConceptError(f"`--loss-guidance` must be >= 0 (0: off), got {config.loss_guidance}")
    if config.max_timestep < 0:
        raise ConceptError(f"`--max-timestep` must be >= 0 (0: the whole schedule), got {config.max_timestep}")
    if not config.pixel_weight >= 0:  # also refuses NaN
        raise ConceptError(f"`--pixel-weight` must be >= 0 (0: off), got {config.pixel_weight}")
    count = len(config.masks) or len(config.tokens) or config.num_concepts
    if config.mask_groups < 0 or (config.mask_groups and config.mask_groups <= count):
        raise ConceptError(
            f"`--mask-groups` must be 0 (tokens + 2) or more than the number of tokens ({count}), "
            f"got {config.mask_groups}"
        )
    if not 0 <= config.mask_min_piece <= 1:  # also refuses NaN
        raise ConceptError(f"`--mask-min-piece` must be between 0 and 1, got {config.mask_min_piece}")
    for name in ("init_search", "init_search_draws", "init_search_rounds"):
        if getattr(config, name) < 0:
            raise ConceptError(f"`--{name.replace('_', '-')}` must be >= 0, got {getattr(config, name)}")
    if config.init_search and (config.init_search_draws < 1 or config.init_search_max_timestep < 1):
        raise ConceptError("`--init-search-draws` and `--init-search-max-timestep` must be >= 1 with `--init-search`")


# ------------------------------------------------------------------------------------------------ model pieces
def _text_pairs(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def vector_tokens(token: str, count: int) -> list[str]:
    """The strings of a token's vectors, named as diffusers' multi-vector textual inversion names them (``<asset0>``,
    ``<asset0>_1``, ...): ``load_textual_inversion`` adds them all and expands the token in prompts."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def add_tokens(pipe: Any, tokens: list[str], initializers: list[str], num_vectors: int = 1) -> list[list[int]]:
    """Add ``tokens`` (each as ``num_vectors`` vectors) to every tokenizer, grow the embedding tables and start each
    new row from its initializer: with as many sub-tokens as vectors, one each (``"red circle"`` for two vectors),
    else their mean; without an initializer, rows near the end of the table, as Break-A-Scene does.

    Returns the new ids per text encoder, concept-major (concept i's vectors are ``ids[i * n : (i + 1) * n]``).
    """
    if initializers and len(initializers) != len(tokens):
        raise ConceptError(f"{len(initializers)} `--initializers` for {len(tokens)} tokens: give one per token")
    strings = [vector for token in tokens for vector in vector_tokens(token, num_vectors)]
    all_ids = []
    for tokenizer, encoder in _text_pairs(pipe):
        added = tokenizer.add_tokens(strings)
        if added != len(strings):
            raise ConceptError(f"only {added} of the tokens {strings} could be added to the tokenizer")
        ids = tokenizer.convert_tokens_to_ids(strings)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for index, token_id in enumerate(ids):
                concept, vector = divmod(index, num_vectors)
                if initializers:
                    source = tokenizer(initializers[concept], add_special_tokens=False).input_ids
                    if not source:
                        raise ConceptError(f"`--initializers` entry {initializers[concept]!r} encodes to no tokens")
                    table[token_id] = table[source[vector]] if len(source) == num_vectors else table[source].mean(0)
                else:
                    table[token_id] = table[-3 * len(strings) + index - 1]
            encoded = tokenizer(" ".join(strings), add_special_tokens=False).input_ids
            for token, token_id in zip(strings, ids, strict=True):
                if encoded.count(token_id) != 1:
                    raise ConceptError(f"the tokenizer does not keep {token!r} as one token")
        all_ids.append(list(ids))
    return all_ids


class ConceptEmbedding(torch.nn.Module):
    """A text encoder's token table with the new tokens' rows as their own parameter.

    Only those rows get gradients and optimizer state. (Break-A-Scene trains the whole table and puts the other rows
    back after every step: an optimizer update of ~49k rows per step, the bulk of a step on a small model.)
    :meth:`merged` writes the rows into the table and returns the stock ``nn.Embedding`` again.
    """

    def __init__(self, table: torch.nn.Embedding, ids: list[int]) -> None:
        super().__init__()
        self.table = table.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, device=table.weight.device), persistent=False)
        self.rows = torch.nn.Parameter(table.weight.detach()[ids].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The table as it currently reads (for code that inspects ``get_input_embeddings().weight``)."""
        return self.table.weight.index_copy(0, self.ids, self.rows.to(self.table.weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.table(input_ids)
        match = input_ids[..., None] == self.ids
        if not bool(match.any()):
            return out
        replaced = match.to(self.rows.dtype) @ self.rows
        return torch.where(match.any(-1, keepdim=True), replaced.to(out.dtype), out)

    @torch.no_grad()
    def merged(self) -> torch.nn.Embedding:
        self.table.weight[self.ids] = self.rows.detach().to(self.table.weight.dtype)
        return self.table


def add_lora(pipe: Any, config: Config) -> None:
    """LoRA adapters on the UNet's attention projections (and the text encoders' with ``--train-text-encoder``);
    their B matrices start at zero, so adding them changes nothing until phase 2 trains them."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe.unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS_UNET,
        )
    )
    if config.train_text_encoder:
        # peft's own injection: transformers' ``add_adapter`` asks for a newer peft than the registries carry
        text_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS_TEXT,
        )
        for _, encoder in _text_pairs(pipe):
            inject_adapter_in_model(text_config, encoder, adapter_name="default")
    # peft marks new adapters trainable; phase 1 must not compute (and keep) their gradients
    for module in [pipe.unet, *[encoder for _, encoder in _text_pairs(pipe)]]:
        for param in _lora_parameters(module):
            param.requires_grad_(False)


def _lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for name, param in module.named_parameters() if "lora_" in name]


def phase2_parameters(pipe: Any, config: Config) -> list[torch.nn.Parameter]:
    """What phase 2 trains besides the embeddings: LoRA weights, or everything with ``--full-finetune``."""
    modules = [pipe.unet] + ([encoder for _, encoder in _text_pairs(pipe)] if config.train_text_encoder else [])
    params = []
    for module in modules:
        if config.full_finetune:
            params.extend(
                param
                for name, param in module.named_parameters()
                if "token_embedding" not in name and "embed_tokens" not in name
            )
        else:
            params.extend(_lora_parameters(module))
    return params


def _encode(
    pipe: Any, prompts: list[str], device: torch.device, size: tuple[int, int]
) -> tuple[torch.Tensor, dict | None]:
    """Prompt embeddings through the pipeline's own ``encode_prompt`` (gradients flow to the embeddings), plus
    SDXL's pooled embeddings and size conditioning."""
    if getattr(pipe, "text_encoder_2", None) is None:
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return embeds, None
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    height, width = size
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    ).to(device)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}


def _encode_image(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


def _target(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def _predicted_clean(
    scheduler: Any, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent the model's prediction implies at these timesteps (the inverse of :func:`_target`)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    signal, noise_level = alphas.sqrt(), (1 - alphas).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return signal * noisy - noise_level * prediction
    return (noisy - noise_level * prediction) / signal


# ------------------------------------------------------------------------------------------------ the trainer
class ConceptTrainer:
    """One training run; :func:`train_concepts` is the entry point. Kept as a class so the automatic masks, the
    attention store and the random streams live in one place that checkpoints can save."""

    def __init__(self, config: Config, accelerator: Any) -> None:
        from attncontrol.models import default_image_size, load_pipeline

        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pipe = load_pipeline(config.model)
        if getattr(self.pipe, "unet", None) is None:
            raise ConceptError(
                f"`--model` {config.model!r} is a {type(self.pipe).__name__}: concept training works on UNet "
                "pipelines (SD 1.x/2.x, SDXL)"
            )
        self.pipe.set_progress_bar_config(disable=True)
        side = config.resolution
        self.size = (side, side) if side else default_image_size(self.pipe)
        tokenizers = [tokenizer for tokenizer, _ in _text_pairs(self.pipe)]
        self.inputs: ConceptInputs = prepare_concepts(
            config.image,
            config.masks or None,
            config.tokens or None,
            size=self.size,
            tokenizers=tokenizers,
            num_concepts=config.num_concepts or None,
        )
        self.tokens = self.inputs.tokens
        if config.initializers and len(config.initializers) != len(self.tokens):
            raise ConceptError(
                f"{len(config.initializers)} `--initializers` for {len(self.tokens)} tokens: give one per token"
            )
        self.pipe.to(self.device)
        for module in (self.pipe.unet, self.pipe.vae, *[e for _, e in _text_pairs(self.pipe)]):
            module.requires_grad_(False).eval()
        self.prior_latents = self._prior_latents()
        self.token_ids = add_tokens(self.pipe, self.tokens, config.initializers, config.num_vectors)
        if config.phase2_steps and not config.full_finetune:
            add_lora(self.pipe, config)
        self.embeddings = []
        for (_, encoder), ids in zip(_text_pairs(self.pipe), self.token_ids, strict=True):
            embedding = ConceptEmbedding(encoder.get_input_embeddings(), ids)
            encoder.set_input_embeddings(embedding)
            self.embeddings.append(embedding)
        self.rows = [embedding.rows for embedding in self.embeddings]
        flipped = self.inputs.pixels.flip(-1)
        self.latents = [_encode_image(self.pipe, self.inputs.pixels[None]), _encode_image(self.pipe, flipped[None])]
        self.latent_grid = tuple(self.latents[0].shape[-2:])
        self.user_masks = self.inputs.masks
        self.masks = self.user_masks  # [N, H, W] at image size; replaced by attention masks when asked
        self.generator = torch.Generator("cpu").manual_seed(config.seed + 1000 * accelerator.process_index)
        self.step = 0
        self.history: list[dict] = []
        self.mask_log: list[dict] = []
        self.initializer_search: list[dict] = []  # the words the search started each token from
        self.attention_grid: tuple[int, int] | None = (
            (config.attention_grid, config.attention_grid) if config.attention_grid else None
        )
        self.optimizer = self._optimizer(phase=1 if config.phase1_steps else 2)

    # ---------------------------------------------------------------- data
    def _prior_latents(self) -> torch.Tensor | None:
        """Images of the class prompt from the untouched model (prior preservation), made once and saved."""
        config = self.config
        if not config.prior_images:
            return None
        folder = self.out / "prior"
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for index in tqdm(
            range(config.prior_images), desc="prior images", disable=not self.accelerator.is_main_process
        ):
            path = folder / f"{index:04d}.png"
            if not path.exists():
                generator = torch.Generator("cpu").manual_seed(10_000 + index)
                image = self.pipe(
                    config.prior_prompt,
                    height=self.size[0],
                    width=self.size[1],
                    num_inference_steps=config.validation_steps,
                    generator=generator,
                    **self._guidance(),
                ).images[0]
                image.save(path)
            from PIL import Image

            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            images.append(torch.from_numpy(array).permute(2, 0, 1))
        return torch.cat([_encode_image(self.pipe, image[None]) for image in images])

    def _guidance(self) -> dict:
        return {"guidance_scale": self.config.guidance_scale} if self.config.guidance_scale else {}

    def _subset(self) -> list[int]:
        """Which concepts this step's prompt names, in prompt order."""
        count = len(self.tokens)
        refresh = self._mask_refresh_due()
        if self.config.sampling == "attencraft":
            choice = int(torch.randint(0, count + 1, (1,), generator=self.generator))
            if choice == count or refresh:
                return torch.randperm(count, generator=self.generator).tolist()
            return [choice]
        if self.config.sampling == "single":
            return [int(torch.randint(0, count, (1,), generator=self.generator))]
        size = int(torch.randint(1, count + 1, (1,), generator=self.generator))
        return torch.randperm(count, generator=self.generator)[:size].tolist()

    @contextmanager
    def observed(self, store: Any) -> Iterator[None]:
        """``store`` records the UNet's attention inside the block; a training call is one step of its own, said
        explicitly so the controller does not look the random timestep up in a sampling schedule."""
        from attncontrol.core.controller import AttentionController

        controller = AttentionController(self.pipe.unet, [store])
        with controller:
            controller.set_step(0, num_steps=1)
            yield

    # ---------------------------------------------------------------- masks from attention
    def _mask_refresh_due(self) -> bool:
        return self.config.mask_source != "user" and self.step % max(1, self.config.mask_refresh_every) == 0

    @torch.no_grad()
    def find_masks(self) -> torch.Tensor:
        """Masks from attention: forward passes of the full prompt at low-noise timesteps (AttenCraft's warm-up
        step), the tokens' cross-attention and the self-attention affinity on the finest self-attention grid of at
        most 32x32 tokens, turned into masks by :func:`attncontrol.concepts.attention_masks`; ``[N, H, W]`` at image
        size. Each layer's token map is divided by its spatial mean first, so a layer whose attention is diffuse
        does not outweigh one that localizes."""
        from attncontrol.core.store import AttentionStore

        config = self.config
        prompt = concept_prompt(self.tokens, config.template)
        positions = [self._positions(prompt, token) for token in self.tokens]
        embeds, added = _encode(self.pipe, [prompt], self.device, self.size)
        token_total: torch.Tensor | None = None
        self_total: torch.Tensor | None = None
        grid: tuple[int, int] | None = None
        for _ in range(config.mask_samples):
            store = AttentionStore(kinds=("cross", "self"), max_image_tokens=32 * 32, keep_grad=False)
            clean = self.latents[0].to(self.device)
            noise = torch.randn(clean.shape, generator=self.generator).to(self.device)
            timestep = torch.randint(0, config.mask_max_timestep, (1,), generator=self.generator).to(self.device)
            noisy = self.pipe.scheduler.add_noise(clean, noise, timestep)
            with self.observed(store):
                self.pipe.unet(noisy, timestep, embeds, added_cond_kwargs=added)
            if grid is None:
                self_grids = sorted({record.grid for record in store.records("self")}, key=lambda g: g[0] * g[1])
                if not self_grids:
                    raise ConceptError("the model has no self-attention layer of <= 32x32 tokens to find masks with")
                grid = self_grids[-1]
            affinity = store.maps("self", size=grid)[0].reshape(grid[0] * grid[1], -1).float()
            maps = []
            for record in store.records("cross"):
                per_token = torch.stack([record.probs[0][:, index].sum(-1) for index in positions]).float()
                if config.mask_method == "cluster":
                    per_token = per_token / per_token.mean(-1, keepdim=True).clamp_min(1e-12)
                per_token = per_token.reshape(len(positions), *record.grid)
                maps.append(F.interpolate(per_token[None], size=grid, mode="bilinear", align_corners=False)[0])
            token_maps = torch.stack(maps).mean(0)
            token_total = token_maps if token_total is None else token_total + token_maps
            self_total = affinity if self_total is None else self_total + affinity
        background = None
        if config.mask_method == "propagate":  # AttenCraft's background handle: the start token's map
            background = store.maps("cross", size=grid)[0][..., 0]
        masks = attention_masks(
            token_total,
            self_total,
            method=config.mask_method,
            background=background,
            threshold=config.mask_threshold,
            groups=config.mask_groups,
            min_piece=config.mask_min_piece,
        )
        masks = F.interpolate(masks.float()[:, None], size=self.size, mode="nearest")[:, 0]
        if config.mask_source == "both":
            rough = torch.stack([dilate(mask, max(1, self.size[0] // 16)) for mask in self.user_masks])
            kept = masks * rough
            empty = kept.flatten(1).sum(1) == 0
            masks = torch.where(empty[:, None, None], self.user_masks, kept)
        return masks

    def refresh_masks(self) -> None:
        """Replace the masks when the new ones are usable: none empty, and (after the first) each as similar to the
        previous one as ``--mask-ssim`` asks."""
        found = self.find_masks()
        first = not self.mask_log
        empty = [token for token, mask in zip(self.tokens, found, strict=True) if mask.sum() == 0]
        similarity = [] if first else [mask_ssim(a, b) for a, b in zip(found, self.masks, strict=True)]
        accepted = not empty and (first or min(similarity) >= self.config.mask_ssim)
        if first and empty:
            raise ConceptError(
                f"no pixel of the image could be assigned to {empty} from attention: give user masks "
                "(--mask-source user or both), other --initializers, or a lower --mask-threshold"
            )
        self.mask_log.append({"step": self.step, "accepted": accepted, "ssim": similarity, "empty": empty})
        if accepted:
            self.masks = found
            if self.accelerator.is_main_process:
                save_mask_images(found, self.tokens, self.out / "masks", self.size, f"step-{self.step:05d}")
            logger.info("masks from attention at step %d: %s", self.step, [int(m.sum()) for m in found])

    # ---------------------------------------------------------------- optimization
    def _optimizer(self, phase: int) -> torch.optim.Optimizer:
        config = self.config
        if phase == 1:
            groups = [{"params": self.rows, "lr": config.phase1_lr}]
        else:
            params = phase2_parameters(self.pipe, config)
            for param in params:
                param.requires_grad_(True)
            groups = [
                {"params": self.rows, "lr": config.phase2_embedding_lr},
                {"params": params, "lr": config.phase2_lr},
            ]
        self.phase = phase
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8)

    def _positions(self, prompt: str, token: str) -> list[int]:
        """Where ``token``'s vectors sit in the encoded prompt (after diffusers expands multi-vector tokens)."""
        from attncontrol.core.tokens import token_indices

        expanded = self.pipe.maybe_convert_prompt(prompt, self.pipe.tokenizer)
        return token_indices(
            self.pipe.tokenizer, expanded, vector_tokens(token, self.config.num_vectors), name="tokens"
        )

    def _token_maps(self, store: Any, prompt: str, subset: list[int], row: int) -> torch.Tensor:
        """Cross-attention of each sampled token on the loss grid: mean over the down/up layers at that grid."""
        records = [r for r in store.records("cross") if r.layer.block != "mid"]
        if self.attention_grid is None:
            grids = sorted({r.grid for r in records}, key=lambda g: g[0] * g[1])
            small = [g for g in grids if max(g) <= 16]
            self.attention_grid = small[-1] if small else grids[0]
        records = [r for r in records if r.grid == self.attention_grid]
        if not records:
            raise ConceptError(f"no cross-attention layer runs at the grid {self.attention_grid} (--attention-grid)")
        maps = []
        for index in subset:
            positions = self._positions(prompt, self.tokens[index])
            per_layer = [r.probs[row][:, positions].sum(-1) for r in records]
            maps.append(torch.stack(per_layer).mean(0).reshape(self.attention_grid))
        return torch.stack(maps)

    def draw_batch(self) -> dict[str, Any]:
        """This step's random choices: which tokens the prompt names, flip, noise, timesteps, prior image."""
        subset = self._subset()
        flip = self.config.hflip and bool(torch.rand((), generator=self.generator) < 0.5)
        rows = 1 if self.prior_latents is None else 2
        prior = None
        if self.prior_latents is not None:
            prior = int(torch.randint(0, len(self.prior_latents), (1,), generator=self.generator))
        noise = torch.randn((rows, *self.latents[0].shape[1:]), generator=self.generator)
        highest = self.pipe.scheduler.config.num_train_timesteps
        if self.config.max_timestep:
            highest = min(highest, self.config.max_timestep)
        timesteps = torch.randint(0, highest, (rows,), generator=self.generator)
        return {"subset": subset, "flip": flip, "prior": prior, "noise": noise, "timesteps": timesteps}

    def losses(self, store: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss terms of one drawn batch (``store`` must be recording cross-attention for the attention loss)."""
        config = self.config
        subset = batch["subset"]
        prompt = concept_prompt([self.tokens[i] for i in subset], config.template)
        clean = self.latents[int(batch["flip"])].to(self.device)
        masks = self.masks[subset].flip(-1) if batch["flip"] else self.masks[subset]
        prompts = [prompt]
        if batch["prior"] is not None:
            clean = torch.cat([self.prior_latents[batch["prior"] : batch["prior"] + 1].to(self.device), clean])
            prompts = [config.prior_prompt, prompt]
        noise, timesteps = batch["noise"].to(self.device), batch["timesteps"].to(self.device)
        noisy = self.pipe.scheduler.add_noise(clean, noise, timesteps)
        target = _target(self.pipe.scheduler, clean, noise, timesteps)
        row = len(prompts) - 1
        guidance = config.loss_guidance if self.phase == 1 or config.loss_guidance_phase2 else 0.0
        unconditional = self._unconditional(noisy[row:], timesteps[row:]) if guidance > 0 else None
        store.reset()
        with self.accelerator.autocast():
            embeds, added = _encode(self.pipe, prompts, self.device, self.size)
            prediction = self.pipe.unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample
        if unconditional is not None:
            guided = unconditional + guidance * (prediction[row:] - unconditional)
            prediction = torch.cat([prediction[:row], guided])
        union = masks.amax(0)[None, None].to(self.device)
        union = F.interpolate(union, size=self.latent_grid, mode="nearest")
        if config.masked_loss:
            diffusion = masked_diffusion_loss(prediction[row:], target[row:], union, mean_over=config.masked_loss_mean)
        else:
            diffusion = F.mse_loss(prediction[row:].float(), target[row:].float())
        loss = diffusion
        terms = {"diffusion": diffusion}
        if config.pixel_weight > 0:
            pixels = self.inputs.pixels.flip(-1) if batch["flip"] else self.inputs.pixels
            clean_guess = _predicted_clean(self.pipe.scheduler, noisy[row:], prediction[row:], timesteps[row:])
            pixel = self._pixel_loss(clean_guess, pixels.to(self.device), masks.amax(0).to(self.device))
            loss = loss + config.pixel_weight * pixel
            terms["pixel"] = pixel
        if batch["prior"] is not None:
            prior = F.mse_loss(prediction[:row].float(), target[:row].float())
            loss = loss + config.prior_weight * prior
            terms["prior"] = prior
        if config.attention_loss != "none":
            token_maps = self._token_maps(store, prompt, subset, row)
            attention = cross_attention_loss(
                token_maps, masks_at(masks, self.attention_grid).to(token_maps), kind=config.attention_loss
            )
            loss = loss + config.attention_weight * attention
            terms["attention"] = attention
        return {"loss": loss, **terms}

    def _pixel_loss(self, clean_latents: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Squared error of the decoded prediction against the image, averaged over the mask's pixels.

        Why: in the latent, colours can sit close to each other and to the background (on shapes-sd red and yellow
        are nearest to white), so a latent loss charges little for drawing the object in the wrong colour; in
        pixels the colour error is what it looks like. The frozen decoder passes the gradient through.
        """
        vae = self.pipe.vae
        latents = clean_latents / vae.config.scaling_factor  # the inverse of _encode_image
        decoded = vae.decode(latents.to(vae.dtype)).sample.float()
        return masked_diffusion_loss(decoded, pixels[None], mask[None, None].float(), mean_over="mask")

    @torch.no_grad()
    def _unconditional(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The empty prompt's prediction, for the guided loss. Without gradients: the token is not in it, and the
        sampler's unconditional branch is whatever the (LoRA-adapted) model predicts."""
        with self.accelerator.autocast():
            embeds, added = _encode(self.pipe, [""] * len(noisy), self.device, self.size)
            return self.pipe.unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample

    def train_step(self, store: Any) -> dict[str, float]:
        """One optimizer step (with gradient accumulation): returns the loss terms."""
        config = self.config
        terms: dict[str, float] = {}
        for _ in range(config.gradient_accumulation_steps):
            parts = self.losses(store, self.draw_batch())
            self.accelerator.backward(parts["loss"] / config.gradient_accumulation_steps)
            for name, value in parts.items():
                terms[name] = terms.get(name, 0.0) + float(value.detach()) / config.gradient_accumulation_steps
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.accelerator.num_processes > 1:
            for param in params:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return terms

    # ---------------------------------------------------------------- where the tokens start
    def _word_ids(self) -> torch.Tensor:
        """The search's candidate words: ``init_words``, else every whole-word, alphabetic entry of the (first)
        tokenizer but the new tokens."""
        tokenizer = _text_pairs(self.pipe)[0][0]
        if self.config.init_words:
            ids = []
            for word in self.config.init_words:
                encoded = tokenizer(word, add_special_tokens=False).input_ids
                if len(encoded) != 1:
                    raise ConceptError(f"`--init-words` entry {word!r} is {len(encoded)} tokens, not one word")
                ids.append(encoded[0])
            return torch.tensor(sorted(set(ids)))
        new = {i for ids in self.token_ids for i in ids}
        words = [
            index
            for token, index in tokenizer.get_vocab().items()
            if token.endswith("</w>") and token[:-4].isalpha() and len(token) > 5 and index not in new
        ]
        return torch.tensor(sorted(words))

    def _search_draws(self, concept: int) -> dict[str, torch.Tensor]:
        """Fixed (flip, noise, timestep) draws for one concept. Seeded by the config alone, not the process, so
        every ``accelerate`` process picks the same words and they train in step."""
        config = self.config
        count = config.init_search_draws
        generator = torch.Generator("cpu").manual_seed(config.seed + 7919 * (concept + 1))
        highest = min(config.max_timestep or 10**9, config.init_search_max_timestep)
        highest = min(highest, self.pipe.scheduler.config.num_train_timesteps)
        flips = torch.rand(count, generator=generator) < (0.5 if config.hflip else 0.0)
        clean = torch.cat([self.latents[int(flip)] for flip in flips.tolist()]).to(self.device)
        noise = torch.randn(clean.shape, generator=generator).to(self.device)
        # stratified: one timestep per equal slice of [0, highest), less noise than independent draws
        timesteps = ((torch.arange(count) + torch.rand(count, generator=generator)) * highest / count).long()
        timesteps = timesteps.to(self.device)
        noisy = self.pipe.scheduler.add_noise(clean, noise, timesteps)
        mask = self.masks[concept][None, None].float()
        masks = torch.where(flips[:, None, None, None], mask.flip(-1), mask)
        masks = F.interpolate(masks, size=self.latent_grid, mode="nearest").to(self.device)
        target = _target(self.pipe.scheduler, clean, noise, timesteps)
        draws = {"noisy": noisy, "timesteps": timesteps, "target": target, "masks": masks}
        unconditional = self._unconditional(noisy, timesteps)
        draws["baseline"] = masked_diffusion_loss(unconditional, target, masks, mean_over="mask", per_sample=True)
        return draws

    def _search_loss(self, concept: int, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """How well ``"a photo of <token>"`` explains the object: on each draw, its masked loss relative to the
        empty prompt's, averaged over the draws.

        Relative, not the plain mean: a draw's loss varies several-fold with its timestep and noise, so a plain
        mean is decided by the few draws with the largest losses, where a word changes little, and the ranking of
        colours flips with the draws; relative to the empty prompt, every draw counts by how much the words explain
        (``benchmarks/concept_search_probe.py``). The plain conditional prediction, not the guided one of
        ``loss_guidance``: that overshoots with strong words and ranks weak ones (a background colour) first.
        """
        prompt = concept_prompt([self.tokens[concept]], self.config.template)
        count = len(draws["noisy"])
        with self.accelerator.autocast():
            embeds, added = _encode(self.pipe, [prompt] * count, self.device, self.size)
            prediction = self.pipe.unet(draws["noisy"], draws["timesteps"], embeds, added_cond_kwargs=added).sample
        per_draw = masked_diffusion_loss(prediction, draws["target"], draws["masks"], mean_over="mask", per_sample=True)
        return (per_draw / draws["baseline"].clamp_min(1e-12)).mean()

    def search_initializers(self) -> None:
        """Start each token's vectors from the vocabulary words that best explain its object.

        Why: phase 1 moves a token from its initializer by gradient steps, and on the shapes model that gradient
        hardly tells colours apart (``benchmarks/concept_loss_probe.py``): a green square's token drifts towards
        blue or stays the model's default red. A discrete search over words sees the whole loss, not its slope.
        Per vector, as in AutoPrompt/GCG: the loss's gradient ranks every candidate word by the first-order change
        of swapping it in, the ``init_search`` best are scored exactly on fixed draws, and the best word (or the
        current row, if none is better) is kept; ``init_search_rounds`` passes over the vectors.
        """
        config = self.config
        words = self._word_ids()
        tables = [embedding.table.weight for embedding in self.embeddings]
        per_token = config.num_vectors
        chosen: list[list[str]] = []
        tokenizer = _text_pairs(self.pipe)[0][0]
        quiet = not self.accelerator.is_main_process
        for concept in tqdm(range(len(self.tokens)), desc="initializer search", disable=quiet):
            draws = self._search_draws(concept)
            vectors = range(concept * per_token, (concept + 1) * per_token)
            names = ["(initializer)"] * per_token
            with torch.no_grad():
                best = float(self._search_loss(concept, draws))
            for _ in range(config.init_search_rounds):
                for position, vector in enumerate(vectors):
                    candidates = words
                    if len(words) > config.init_search:
                        # autograd.grad, not backward: the LoRA weights must not keep gradients from the search
                        grads = torch.autograd.grad(self._search_loss(concept, draws), self.rows)
                        gains = sum(
                            (table[words].float() - rows[vector].detach().float()) @ grad[vector].float()
                            for table, rows, grad in zip(tables, self.rows, grads, strict=True)
                        )
                        candidates = words[gains.argsort()[: config.init_search]]
                    current = [rows[vector].detach().clone() for rows in self.rows]
                    scores = []
                    with torch.no_grad():
                        for word in candidates.tolist():
                            for table, rows in zip(tables, self.rows, strict=True):
                                rows[vector] = table[word].to(rows.dtype)
                            scores.append(float(self._search_loss(concept, draws)))
                        pick = int(np.argmin(scores))
                        if scores[pick] < best:
                            best, word = scores[pick], int(candidates[pick])
                            current = [table[word].to(r.dtype) for table, r in zip(tables, self.rows, strict=True)]
                            names[position] = tokenizer.convert_ids_to_tokens(word).removesuffix("</w>")
                        for rows, row in zip(self.rows, current, strict=True):
                            rows[vector] = row
            chosen.append(names)
            logger.info("%s starts from %s (search loss %.4f)", self.tokens[concept], " ".join(names), best)
        self.initializer_search = [{"token": t, "words": n} for t, n in zip(self.tokens, chosen, strict=True)]

    # ---------------------------------------------------------------- state
    def _trainable_state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        state: dict[str, Any] = {"embeddings": [rows.detach().clone().cpu() for rows in self.rows]}
        if self.config.full_finetune:
            state["unet"] = {k: v.detach().cpu() for k, v in self.pipe.unet.state_dict().items()}
            if self.config.train_text_encoder:
                state["text_encoders"] = [
                    {k: v.detach().cpu() for k, v in e.state_dict().items()} for _, e in _text_pairs(self.pipe)
                ]
        elif self.config.phase2_steps:
            state["unet"] = get_peft_model_state_dict(self.pipe.unet)
            if self.config.train_text_encoder:
                state["text_encoders"] = [
                    get_peft_model_state_dict(e, adapter_name="default") for _, e in _text_pairs(self.pipe)
                ]
        return state

    def _load_trainable_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        with torch.no_grad():
            for rows, saved in zip(self.rows, state["embeddings"], strict=True):
                rows.copy_(saved.to(rows.device, rows.dtype))
        encoders = [e for _, e in _text_pairs(self.pipe)]
        if self.config.full_finetune:
            if "unet" in state:
                self.pipe.unet.load_state_dict(state["unet"])
            for encoder, encoder_state in zip(encoders, state.get("text_encoders", []), strict=False):
                encoder.load_state_dict(encoder_state)
        elif "unet" in state:
            set_peft_model_state_dict(self.pipe.unet, state["unet"])
            for encoder, encoder_state in zip(encoders, state.get("text_encoders", []), strict=False):
                set_peft_model_state_dict(encoder, encoder_state, adapter_name="default")

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        save_checkpoint(
            self.out / "checkpoint.pt",
            {
                "step": self.step,
                "phase": self.phase,
                "trainable": self._trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "rng": rng_state(),
                "masks": self.masks,
                "attention_grid": self.attention_grid,
                "history": self.history,
                "mask_log": self.mask_log,
                "initializer_search": self.initializer_search,
                "tokens": self.tokens,
            },
        )

    def resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            logger.warning("--resume: no checkpoint in %s, starting at step 0", self.out)
            return False
        state = load_checkpoint(path)
        if state["tokens"] != self.tokens:
            raise ConceptError(f"the checkpoint in {self.out} trained the tokens {state['tokens']}, not {self.tokens}")
        self._load_trainable_state(state["trainable"])
        if state["phase"] != self.phase:
            self.optimizer = self._optimizer(state["phase"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.step, self.history, self.mask_log = state["step"], state["history"], state["mask_log"]
        self.initializer_search = state.get("initializer_search", [])
        self.masks, self.attention_grid = state["masks"], state["attention_grid"]
        logger.info("resumed at step %d (phase %d)", self.step, self.phase)
        return True

    # ---------------------------------------------------------------- outputs
    def input_image(self) -> Any:
        from PIL import Image

        array = ((self.inputs.pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        return Image.fromarray(array.astype(np.uint8))

    @torch.no_grad()
    def validate(self, tag: str) -> Path | None:
        """Each token alone and all together, ``--validation-seeds`` seeds each, saved as one strip per seed row."""
        if not self.accelerator.is_main_process or self.config.validation_seeds <= 0:
            return None
        from PIL import Image

        from attncontrol.pictures import strip

        prompts = [self.config.template.format(token) for token in self.tokens]
        prompts.append(concept_prompt(self.tokens, self.config.template))
        rows = []
        for seed in range(self.config.validation_seeds):
            images = self.pipe(
                prompts,
                height=self.size[0],
                width=self.size[1],
                num_inference_steps=self.config.validation_steps,
                generator=[torch.Generator("cpu").manual_seed(seed) for _ in prompts],
                **self._guidance(),
            ).images
            rows.append(strip([self.input_image(), *images], min_height=128))
        canvas = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
        for index, row in enumerate(rows):
            canvas.paste(row, (0, index * rows[0].height))
        folder = self.out / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{tag}.png"
        canvas.save(path)
        return path

    def export(self, metrics: dict) -> None:
        """The files a stock diffusers pipeline loads: one textual-inversion file per token, the LoRA weights (or
        the whole pipeline after full fine-tuning), and the manifest :func:`load_concepts` reads."""
        if not self.accelerator.is_main_process:
            return
        from safetensors.torch import save_file

        folder = self.out / "learned_embeds"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, token in enumerate(self.tokens):
            count = self.config.num_vectors
            # [vectors, dim] per text encoder; SD's single-vector files hold a bare [dim] row
            span = slice(index * count, (index + 1) * count)
            rows = [table.detach()[span].float().cpu().contiguous() for table in self.rows]
            if len(rows) == 1:
                state = {token: rows[0][0] if count == 1 else rows[0]}
            else:
                state = {"clip_l": rows[0], "clip_g": rows[1]}
            name = f"learned_embeds/{safe_name(token)}.safetensors"
            save_file(state, str(self.out / name))
            files.append(name)
        lora = None
        if self.config.full_finetune:
            self.merge_embeddings()
            self.pipe.save_pretrained(self.out / "pipeline")
        elif self.config.phase2_steps:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))}
            if self.config.train_text_encoder:
                names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
                for name, (_, encoder) in zip(names, _text_pairs(self.pipe), strict=False):
                    state = get_peft_model_state_dict(encoder, adapter_name="default")
                    layers[name] = convert_state_dict_to_diffusers(state)
            type(self.pipe).save_lora_weights(self.out, weight_name=LORA_WEIGHTS, **layers)
            lora = LORA_WEIGHTS
        manifest = {
            "model": self.config.model,
            "tokens": self.tokens,
            "initializers": self.config.initializers,
            "template": self.config.template,
            "embeddings": files,
            "lora": lora,
            "full_finetune": self.config.full_finetune,
            "num_vectors": self.config.num_vectors,
            "mask_source": self.config.mask_source,
            "size": list(self.size),
            "steps": self.step,
        }
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # ---------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> dict:
        from attncontrol.core.store import AttentionStore

        config = self.config
        if resume:
            self.resume()
        if config.mask_source != "user" and not self.mask_log:
            self.refresh_masks()
        if config.init_search and self.step == 0:
            self.search_initializers()
        store = AttentionStore(kinds="cross", keep_grad=True, layers="cross")
        started = time.perf_counter()
        bar = tqdm(
            total=config.total_steps, initial=self.step, desc="concepts", disable=not self.accelerator.is_main_process
        )
        recent: list[dict[str, float]] = []
        while self.step < config.total_steps:
            if config.minutes and (time.perf_counter() - started) / 60 >= config.minutes:
                logger.warning("stopping at step %d: the --minutes cap of %.1f was reached", self.step, config.minutes)
                break
            if self.phase == 1 and self.step >= config.phase1_steps:
                self.optimizer = self._optimizer(phase=2)
            if self.step > 0 and self._mask_refresh_due():
                self.refresh_masks()
            if config.attention_loss != "none":
                with self.observed(store):
                    terms = self.train_step(store)
            else:
                terms = self.train_step(store)
            self.step += 1
            recent = [*recent[-49:], terms]
            means = {key: float(np.mean([r.get(key, 0.0) for r in recent])) for key in terms}
            bar.update(1)
            bar.set_postfix({"phase": self.phase, **{k: f"{v:.4f}" for k, v in means.items()}})
            if self.step % config.checkpoint_every == 0 or self.step == config.total_steps:
                self.history.append({"step": self.step, "phase": self.phase, **means})
                self.save_checkpoint()
            if config.validation_every and self.step % config.validation_every == 0:
                self.validate(f"step-{self.step:05d}")
        bar.close()
        store.reset()
        minutes = (time.perf_counter() - started) / 60
        metrics = {
            "steps": self.step,
            "minutes": minutes,
            "history": self.history,
            "masks": self.mask_log,
            "initializer_search": self.initializer_search,
        }
        self.validate("final")
        self.export(metrics)
        dump = os.environ.get("ATTNCONTROL_DUMP_ROWS")
        if dump:  # tests: every process's final token rows, to check that processes trained in step
            torch.save(self.rows[0].detach().cpu(), Path(dump) / f"rows-{self.accelerator.process_index}.pt")
        self.merge_embeddings()
        return metrics

    def merge_embeddings(self) -> None:
        """Put stock embedding tables (with the learned rows written in) back into the text encoders."""
        for (_, encoder), embedding in zip(_text_pairs(self.pipe), self.embeddings, strict=True):
            if encoder.get_input_embeddings() is embedding:
                encoder.set_input_embeddings(embedding.merged())


def train_concepts(config: Config, resume: bool = False) -> TrainedConcepts:
    """Train, export and return the trained pipeline (its LoRA and tokens still in place) with the metrics."""
    check_config(config)
    accelerator, out = start_run(config)
    trainer = ConceptTrainer(config, accelerator)
    metrics = trainer.run(resume=resume)
    return TrainedConcepts(pipeline=trainer.pipe, tokens=trainer.tokens, out=out, metrics=metrics)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    recipe_flag = {"choices": list(RECIPES), "default": "break-a-scene"}
    early = argparse.ArgumentParser(add_help=False)  # the recipe first: its values become the flags' defaults
    early.add_argument("--recipe", **recipe_flag)
    recipe = early.parse_known_args(argv)[0].recipe

    def add_recipe(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--recipe", help="named settings (RECIPES); explicit flags win", **recipe_flag)
        parser.set_defaults(**RECIPES[recipe])

    config, args = parse_config(Config, __doc__, argv, add_recipe)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_concepts(config, resume=args.resume)
    finish_processes()


if __name__ == "__main__":
    main()
