"""Train the Flux-architecture shapes-world model on the CPU: CLIP + T5 text encoders and a FluxTransformer2DModel.

    python -m attncontrol.training.shapes_flux --out runs/shapes-flux            # the shipped shapes-flux recipe
    python -m attncontrol.training.shapes_flux --out runs/shapes-flux --resume

Rectified flow on packed latents, as Flux is trained: ``x_t = (1 - t) x_0 + t noise`` with velocity target
``noise - x_0``; ``t`` is uniform by default (``--timestep-sampling``) and the transformer sees it in [0, 1]
(the pipeline passes ``timestep / 1000``).
By default there is no guidance distillation, so the model is trained with 10% empty captions and sampled with true
CFG: ``pipe(prompt, negative_prompt="", true_cfg_scale=5.0, max_sequence_length=32)`` (the bench does this for you).
With a teacher, ``--guidance-min/--guidance-max`` distil its guided velocity into a guidance embedding instead
(FLUX.1-dev's form): ``pipe(prompt, guidance_scale=5.0, max_sequence_length=32)``.

With ``--teacher shapes-sd`` the targets are the shipped SD-architecture model's predictions, mapped onto flow
times (:mod:`attncontrol.training.flow_teacher`), and the student takes over its autoencoder and CLIP text encoder.
Without a teacher the autoencoder is the shapes-world one: reuse a trained one with ``--vae`` or let this script
train it.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attncontrol.training.common import (
    LossLog,
    StageClock,
    autocast,
    ema_update,
    finish_processes,
    load_checkpoint,
    probe_single_objects,
    rng_state,
    save_checkpoint,
    set_learning_rate,
    set_rng_state,
    start_shapes_run,
    training_controller,
)
from attncontrol.training.flow_teacher import FlowTeacher, student_text_encoder
from attncontrol.training.grounding import GroundingTerm, grounding_targets, scene_objects
from attncontrol.training.layouts import region_training, scene_boxes
from attncontrol.training.shapes_text import (
    TEXT_HIDDEN,
    shapes_clip_text_encoder,
    shapes_clip_tokenizer,
    shapes_t5_tokenizer,
)
from attncontrol.training.shapes_vae import (
    ShapesTrainingConfig,
    encode_pool,
    latent_grid,
    object_coverage,
    train_vae,
)

logger = logging.getLogger("attncontrol.training.shapes_flux")


@dataclass
class Config(ShapesTrainingConfig):
    out: str = "runs/shapes-flux"
    vae: str = ""  # a saved AutoencoderKL folder to reuse instead of training one (not with --teacher)
    # The shipped model's autoencoder: factor 4 (an 8x8 grid of 64 image tokens, steps about 3x cheaper than factor
    # 2's 256) with 8 latent channels, the colour codes on (every colour drawn in 204 of 204 bench images, where the
    # uncoded latents gave blue and blank backgrounds).
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 8  # channels of the latent the transformer works on (4 of them hold the colour codes)
    vae_colour_codes: float = 1.0
    pool_size: int = 20000
    pool_count_weights: tuple[float, float, float] = (0.3, 0.45, 0.25)
    vocab_size: int = 16384
    max_length: int = 32
    # Transformer stage: at most this many steps; --minutes may end it first, and the learning rate decays over
    # whichever of the two budgets runs out first.
    steps: int = 20000
    # Transformer stage: wall-clock budget in minutes, training only (the pool encode before it is not counted),
    # summed over resumes like --steps: a resumed run stops at the same total.
    minutes: float = 80.0
    # The whole command's wall clock (0: no cap), from the start of training: when the autoencoder and the pool encode
    # leave the transformer less than --minutes, its stage ends (and its rate decays) that much sooner, so the command
    # stays inside the 90-minute budget on a slower CPU too. Per invocation: a resume gets its own.
    total_minutes: float = 89.0
    probe_every: int = 2000  # steps between detector probes (24 images each, time taken from the --minutes budget)
    # Share of the captioned rows trained through the regional control's hard masks in the joint attention
    # (attncontrol.training.layouts), from step ``region_start`` on; 0 turns it off. The shipped recipe's 0.35 from
    # step 4000 took layouts from 2/120 to 40/120, two objects from 10/408 to 151/408 and single objects from 169/204
    # to 179/204 (guidance 4): benchmarks/results/shapes-flux-bench-cpu.md.
    region_fraction: float = 0.35
    region_start: int = 4000  # see --region-fraction
    batch: int = 32  # rows per step
    lr: float = 1e-3  # learning rate (AdamW, after the warm-up)
    layers: int = 2  # dual-stream (MMDiT) blocks
    single_layers: int = 4  # single-stream blocks
    heads: int = 4  # attention heads; the width is heads x head_dim
    head_dim: int = 32  # width per head (16 left RoPE no frequency that spans a row: see the attempts record)
    # DiT's adaLN-Zero: every block starts as the identity and the output head at zero (diffusers' Flux does not).
    adaln_zero: bool = True
    # "uniform" or "logit-normal" (SD3's choice). Uniform: logit-normal times rarely reach t > 0.9, where the first
    # sampling steps decide whether and where an object appears (factor-4 pilots: more colours drawn, fewer blanks).
    timestep_sampling: str = "uniform"
    # Extra loss weight on image tokens covered by objects (0: plain MSE). Colours close to the background in latent
    # space (red, yellow on white) cost a plain MSE little; this makes getting the objects right count more.
    object_weight: float = 0.0
    # A trained SD-architecture pipeline (path or shipped name) whose predictions are the velocity targets
    # (attncontrol.training.flow_teacher); its autoencoder and CLIP text encoder are taken over too. "" trains from
    # the data alone.
    teacher: str = ""
    # Share of the target that comes from the teacher (the rest is the data's ``noise - x0``).
    teacher_weight: float = 1.0
    # Train the CLIP text encoder (its pooled vector conditions every block). With a teacher it starts as the
    # teacher's, which already tells the objects apart; --no-train-clip keeps it so.
    train_clip: bool = True
    # "velocity": plain flow-matching MSE. "x0": each row weighted by t^2 (normalised to mean 1), i.e. the error of
    # the clean latent the velocity implies, x0 = x_t - t v: the noisy end, where layout and colour are decided,
    # counts more than predicting the noise at the clean end.
    loss_weighting: str = "velocity"
    # Guidance distillation, FLUX.1-dev's form (needs a teacher): the target is the teacher's classifier-free-guided
    # velocity at a scale drawn from [guidance_min, guidance_max], which the transformer reads through its guidance
    # embedding, so the model samples with one pass per step (`guidance_scale`, no true CFG). Why: trained on the
    # unguided velocity the students' conditional-minus-unconditional direction kept a cosine of ~0.2 with the
    # teacher's, and true CFG 5 amplifies exactly that difference; here the amplified direction is the target.
    # 0 and 0: off.
    guidance_min: float = 0.0
    guidance_max: float = 0.0  # see --guidance-min
    # The per-token text the joint attention reads (FluxPipeline's text_encoder_2): "t5", a small T5 trained from
    # scratch with the transformer, or (with a teacher) "teacher-clip", the teacher's CLIP hidden states, the tokens its
    # cross-attention already grounds colours and shapes on, cut like the pooled encoder (trained with --train-clip).
    sequence_encoder: str = "t5"
    # Feature alignment with the teacher (REPA's idea, with the teacher's own features as the target): the image
    # tokens after the last dual-stream block, through a small MLP, are pulled towards the teacher UNet's last 16x16
    # decoder features at the same noisy latent (1 - cosine per token). Why: the students learned the teacher's
    # outputs too slowly to follow its layout decisions in 2,000 steps; REPA reports DiTs converging many times faster
    # when an early layer is aligned with a good representation. 0: off.
    feature_weight: float = 0.0
    # Reflow (rectified flow's second round, with the teacher as the first flow): before training, this many pool
    # captions are sampled by the teacher's guided field from fixed noises (Euler, `reflow_steps`), and the student
    # regresses onto the straight path between each noise and its sample. Why: with independent noise and data the
    # target at high t is an average over every place an object could go, and the students learnt that blank average
    # long before the teacher's noise-to-layout decision; a paired noise has one answer. Needs --guidance-min/max
    # (each pair's scale is fed to the guidance embedding). 0: off.
    reflow_pairs: int = 0
    reflow_steps: int = 10  # Euler steps of the teacher's sampling of each pair (see --reflow-pairs)
    # Each reflow noise is sampled with this many captions (consecutive pool captions), not one. Why: with one caption
    # per noise the noise alone tells the student its target, and the reflow students drew the same blob for a seed
    # whatever shape the prompt named (only the colour followed the words); a noise shared by captions of other
    # shapes makes the words the only way to the target. Measured at 4 (attempts record, run K1, 2,751 steps): the
    # student still drew the seed's blob whatever the shape word; not enough on its own in this CPU's budget.
    reflow_captions_per_noise: int = 1
    # With --reflow-pairs: training rows whose flow time is below this take the pool's own scene (the one the pair's
    # caption describes) with fresh noise and the data's target instead of the pair. Why: the reflow students bound
    # colours but drew blurry shapes, having only ever seen the teacher's 8-10-step samples; the clean end, where edges
    # are drawn, is where the data's crisp scenes teach and the pairs' one-answer noise is no longer needed. 0: off.
    # Measured at 0.5 (attempts record, run H1): no crisper shapes; the outline came with the noise (see above).
    reflow_data_below: float = 0.0


class FeatureAlignment:
    """The student's image tokens after its last dual-stream block, projected to the teacher's feature width, against
    the teacher's features at the same noisy latent (``1 - cosine`` per token, REPA's loss)."""

    def __init__(self, width: int, teacher_channels: int, hidden: int = 256):
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, teacher_channels)
        )
        self.tokens: torch.Tensor | None = None

    def watch(self, transformer) -> None:
        def keep(_module, _inputs, output) -> None:
            self.tokens = output[1]  # a dual-stream block returns (text, image)

        transformer.transformer_blocks[-1].register_forward_hook(keep)

    def loss(self, teacher_features: torch.Tensor) -> torch.Tensor:
        target = teacher_features.flatten(2).transpose(1, 2).float()  # [B, C, H, W] -> tokens in row-major order
        if target.shape[1] != self.tokens.shape[1]:
            raise ValueError(f"teacher features give {target.shape[1]} tokens, the student has {self.tokens.shape[1]}")
        projected = self.projector(self.tokens.float())
        return (1 - torch.nn.functional.cosine_similarity(projected, target, dim=-1)).mean()


def build_text_encoders(config: Config, teacher: FlowTeacher | None = None):
    """(CLIP for the pooled vector, sequence encoder for the joint attention, their two tokenizers); ``main`` has
    checked ``config.sequence_encoder``."""
    from transformers import T5Config, T5EncoderModel

    clip_tok = shapes_clip_tokenizer(config.vocab_size, config.max_length)
    if teacher is not None:  # the teacher's encoder already tells its objects apart: a head start for the pooled vector
        clip = student_text_encoder(teacher.text_encoder, config.vocab_size, config.max_length)
    else:
        clip = shapes_clip_text_encoder(2, config.vocab_size, config.max_length)
    if config.sequence_encoder == "teacher-clip":
        if teacher is None:
            raise ValueError("`--sequence-encoder teacher-clip` needs `--teacher`")
        return (
            clip,
            student_text_encoder(teacher.text_encoder, config.vocab_size, config.max_length),
            clip_tok,
            clip_tok,
        )
    t5_tok = shapes_t5_tokenizer(config.vocab_size, config.max_length)
    t5 = T5EncoderModel(
        T5Config(
            d_model=TEXT_HIDDEN,
            d_ff=4 * TEXT_HIDDEN,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            vocab_size=len(t5_tok),
            dropout_rate=0.0,
        )
    )
    return clip, t5, clip_tok, t5_tok


def build_transformer(config: Config, latent_channels: int = 4):
    """Flux's transformer over packed latents: each token is a 2x2 patch of the autoencoder's latent."""
    from diffusers import FluxTransformer2DModel

    rope = rope_axes(config.head_dim)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=config.layers,
        num_single_layers=config.single_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=config.guidance_max > 0,
        axes_dims_rope=rope,
    )
    if config.adaln_zero:
        zero_init_modulation(transformer)
    return transformer


def rope_axes(head_dim: int) -> list[int]:
    """RoPE dims per (id, row, col) axis: nearly all to rows and columns, 4 to the id axis (always 0 here).

    Flux's RoPE uses theta 10,000. On the shapes model's 16x16 token grid the first frequency of an axis (1 rad per
    token) repeats every ~6 tokens and the lowest ones barely turn, so an axis needs a frequency in between to place
    a token along a row: 14 dims (7 frequencies: 1, 0.27, 0.072... rad per token) at head_dim 32 have one; 6 dims
    (head_dim 16: 1, 0.046, 0.002) do not, and those samples came out as scattered blobs.
    """
    spatial = (head_dim - 4) // 4 * 2
    return [head_dim - 2 * spatial, spatial, spatial]


def zero_init_modulation(transformer) -> None:
    """Zero the adaptive-norm projections and the output layer (DiT's adaLN-Zero).

    The gates start at 0, so each block is the identity until it learns what to add; the DiT paper found this
    initialisation trains markedly faster than plain adaLN, which matters for a model trained in 45 CPU minutes.
    """
    layers = [block.norm1.linear for block in transformer.transformer_blocks]
    layers += [block.norm1_context.linear for block in transformer.transformer_blocks]
    layers += [block.norm.linear for block in transformer.single_transformer_blocks]
    layers += [transformer.norm_out.linear, transformer.proj_out]
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def build_pipeline(vae, clip, t5, transformer, config: Config):
    """A FluxPipeline of the parts; ``t5`` is whichever sequence encoder ``config.sequence_encoder`` names."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=clip,
        tokenizer=shapes_clip_tokenizer(config.vocab_size, config.max_length),
        text_encoder_2=t5,
        tokenizer_2=(
            shapes_clip_tokenizer(config.vocab_size, config.max_length)
            if config.sequence_encoder == "teacher-clip"
            else shapes_t5_tokenizer(config.vocab_size, config.max_length)
        ),
        transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_timesteps(kind: str, count: int, device) -> torch.Tensor:
    """Flow-matching times t in (0, 1); t = 1 is pure noise."""
    if kind == "uniform":
        return torch.rand(count, device=device)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(count, device=device))
    raise ValueError(f"`timestep_sampling` must be 'uniform' or 'logit-normal', got {kind!r}")


def predict_velocity(
    transformer, packed: torch.Tensor, t: torch.Tensor, text, text_ids, img_ids, guidance: torch.Tensor | None = None
) -> torch.Tensor:
    """The transformer's velocity for packed latents at flow times ``t`` (in [0, 1]); ``text``: (T5 sequence, pooled
    CLIP vector) from :func:`encode_text`; ``guidance``: the scale per row, for a guidance-distilled transformer
    (FluxPipeline passes ``guidance_scale`` as is)."""
    sequence, pooled = text
    return transformer(
        hidden_states=packed,
        timestep=t,
        guidance=guidance,
        encoder_hidden_states=sequence,
        pooled_projections=pooled,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


def flow_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    weighting: str = "velocity",
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean squared velocity error over packed tokens ``[B, N, C]``, normalised by the mean weight.

    ``"x0"`` weights each row by ``t^2``: since ``x0 = x_t - t v``, that is the error of the implied clean latent.
    ``token_weight`` ``[B, N]`` multiplies in (``--object-weight``).
    """
    error = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    weight = torch.ones_like(error) if token_weight is None else token_weight.to(error)
    if weighting == "x0":
        weight = weight * (t.float() ** 2)[:, None]
    return (weight * error).mean() / weight.mean()


def unpack(packed: torch.Tensor, grid: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``[B, grid * grid, 4C]`` -> ``[B, C, 2 grid, 2 grid]``."""
    batch, _, channels = packed.shape
    latents = packed.view(batch, grid, grid, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, 2 * grid, 2 * grid)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], the FluxPipeline layout."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(0, row, col) per packed token, as FluxPipeline builds them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def encode_text(clip, t5, clip_tok, t5_tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence and pooled CLIP vector, each padded to its tokenizer's length (what FluxPipeline feeds)."""
    options = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
    clip_ids = clip_tok(texts, max_length=clip_tok.model_max_length, **options).input_ids
    pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_ids = t5_tok(texts, max_length=t5_tok.model_max_length, **options).input_ids
    return t5(t5_ids.to(device))[0], pooled


def draw_guidance(config: Config, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Guidance scales uniform in ``[guidance_min, guidance_max]``: per training row, or per reflow pair."""
    return config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(count, generator=generator)


def reflow_pairs(
    teacher: FlowTeacher,
    captions: list[str],
    config: Config,
    latent_shape: tuple[int, ...],
    path: Path,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """``noise``, ``sample`` (unpacked latents) and ``guidance`` (one scale each) for the first ``config.reflow_pairs``
    captions: the teacher's guided field integrated from each noise (one noise for each run of
    ``config.reflow_captions_per_noise`` captions). Saved to ``path`` after every chunk, so a crash
    or ``--resume`` goes on where it stopped; noises and scales come from the config's seed, so a resumed file
    matches a fresh one."""
    count, share = config.reflow_pairs, config.reflow_captions_per_noise
    generator = torch.Generator().manual_seed(config.seed + 2)
    noise = torch.randn((-(-count // share), *latent_shape), generator=generator).repeat_interleave(share, 0)[:count]
    guidance = draw_guidance(config, count, generator)
    pairs = {"noise": noise, "sample": torch.empty_like(noise), "guidance": guidance, "done": 0}
    pairs["captions"] = captions[:count]
    if path.exists():
        saved = load_checkpoint(path)
        same = saved["captions"] == pairs["captions"]
        if same and torch.equal(saved["noise"], noise) and torch.equal(saved["guidance"], guidance):
            pairs = saved
    device = next(teacher.unet.parameters()).device
    with tqdm(total=count, initial=pairs["done"], desc="reflow pairs") as bar:
        while pairs["done"] < count:
            rows = slice(pairs["done"], min(pairs["done"] + chunk, count))
            sample = teacher.sample(
                noise[rows].to(device), captions[rows], guidance[rows].to(device), config.reflow_steps
            )
            pairs["sample"][rows] = sample.cpu()
            pairs["done"] = rows.stop
            save_checkpoint(path, pairs)
            bar.update(rows.stop - rows.start)
    return pairs


def train_transformer(
    config: Config, accelerator, out: Path, vae_path: Path | None, resume: bool, started: float | None = None
) -> dict:
    """Train the transformer stage; ``started`` is the command's ``perf_counter`` start, for ``--total-minutes``."""
    from diffusers import AutoencoderKL

    teacher = None
    if config.teacher:
        # The student lives in the teacher's latent space: its autoencoder and scaling, no shift.
        teacher = FlowTeacher.from_pretrained(config.teacher).to(accelerator.device)
        vae = copy.deepcopy(teacher.vae)
    else:
        vae = AutoencoderKL.from_pretrained(vae_path)
    sample_timesteps(config.timestep_sampling, 1, "cpu")  # a bad setting fails before the pool is encoded
    # Token grid of the packed latents: the autoencoder's factor, then Flux's 2x2 packing.
    grid = latent_grid(vae) // 2
    per_scene = {}
    if config.object_weight > 0:
        per_scene["coverage"] = partial(object_coverage, grid=grid)
    if config.grounding_weight > 0:
        per_scene["objects"] = partial(scene_objects, grid=grid)
    if config.region_fraction > 0:
        per_scene["boxes"] = scene_boxes
    latents, captions, extras = encode_pool(
        vae, config.pool_size, config.seed + 1, config.pool_count_weights, per_scene=per_scene
    )
    coverage = torch.stack(extras.pop("coverage")) if "coverage" in extras else None
    if teacher is None:
        shift, scaling = float(latents.mean()), float(1.0 / latents.std())
    else:
        shift, scaling = 0.0, teacher.scaling_factor
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    packed = pack((latents - shift) * scaling)
    pairs, scenes = None, None
    if config.reflow_pairs:
        path = out / "reflow-pairs.pt"
        if accelerator.is_main_process:  # one process samples; the others read its file
            pairs = reflow_pairs(teacher, captions, config, tuple(latents.shape[1:]), path)
        accelerator.wait_for_everyone()
        if pairs is None:
            pairs = load_checkpoint(path)
        if config.reflow_data_below > 0:  # row i of the pairs and of the pool share caption i
            scenes = packed[: config.reflow_pairs]
        packed, captions = pack(pairs["sample"]), captions[: config.reflow_pairs]
        pairs = {"noise": pack(pairs["noise"]), "guidance": pairs["guidance"]}
    logger.info("flux: pool of %d scenes, %d tokens of %d channels", len(packed), packed.shape[1], packed.shape[2])

    torch.manual_seed(config.seed)
    clip, t5, clip_tok, t5_tok = build_text_encoders(config, teacher)
    transformer = build_transformer(config, vae.config.latent_channels)
    grounding = None
    if "objects" in extras:  # Flux's per-token text is T5's: its keys are the ones grounded
        targets = grounding_targets(captions, extras.pop("objects"), t5_tok, grid)
        grounding = GroundingTerm(targets, config.grounding_weight, config.grounding_start)
    # The masks hide T5's tokens, the ones the joint attention reads.
    regions = region_training(config, captions, extras.pop("boxes"), t5_tok) if "boxes" in extras else None
    clip.requires_grad_(config.train_clip)
    if config.sequence_encoder == "teacher-clip":
        t5.requires_grad_(config.train_clip)
    modules = [transformer, clip, t5]
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    alignment = None
    if config.feature_weight > 0:
        alignment = FeatureAlignment(transformer.inner_dim, teacher.watch_features())
        params += list(alignment.projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    emas = [copy.deepcopy(module).eval() for module in modules]
    step, history, spent = 0, [], 0.0
    checkpoint = out / "checkpoint-flux.pt"
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        for module, ema, saved, saved_ema in zip(modules, emas, state["modules"], state["emas"], strict=True):
            module.load_state_dict(saved)
            ema.load_state_dict(saved_ema)
        optimizer.load_state_dict(state["optimizer"])
        step, history, spent = state["step"], state["history"], state.get("minutes", 0.0)
        if alignment is not None:
            alignment.projector.load_state_dict(state["projector"])
        set_rng_state(state["rng"])
        logger.info("flux: resumed at step %d", step)
    transformer, clip, t5, optimizer = accelerator.prepare(transformer, clip, t5, optimizer)
    live = [accelerator.unwrap_model(m) for m in (transformer, clip, t5)]
    if alignment is not None:  # its gradients are averaged across processes like the transformer's
        alignment.projector = accelerator.prepare(alignment.projector)
        alignment.watch(live[0])
    ids = image_ids(grid, grid).to(accelerator.device)
    text_ids = torch.zeros(config.max_length, 3, device=accelerator.device)

    clock = StageClock(config.steps, transformer_budget(config, spent, started), spent)
    log = LossLog()
    bar = tqdm(total=config.steps, initial=step, desc="flux", disable=not accelerator.is_main_process)
    with ExitStack() as observing:
        controller = None
        if grounding is not None or regions is not None or config.mixed_precision != "no":
            controller = training_controller(observing, live[0])
        while clock.running(step):
            index = torch.randint(0, len(packed), (config.batch,))
            x0 = packed[index].to(accelerator.device)
            # A reflow pair is its caption's sample: it has no empty-caption row.
            dropout = 0.0 if pairs is not None else config.caption_dropout
            texts = [captions[i] if random.random() >= dropout else "" for i in index.tolist()]
            sequence, pooled = encode_text(clip, t5, clip_tok, t5_tok, texts, accelerator.device)
            if grounding is not None:
                grounding.begin_step(controller, step)
            if regions is not None:
                regions.begin_step(controller, step, index, texts)
            noise = torch.randn_like(x0) if pairs is None else pairs["noise"][index].to(x0.device)
            t = sample_timesteps(config.timestep_sampling, len(x0), x0.device)
            if scenes is not None:
                clean = (t < config.reflow_data_below)[:, None, None]
                x0 = torch.where(clean, scenes[index].to(x0.device), x0)
                noise = torch.where(clean, torch.randn_like(noise), noise)
            noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            target = noise - x0
            guidance = None
            if pairs is not None:
                guidance = pairs["guidance"][index].to(x0.device)
            elif config.guidance_max > 0:
                guidance = draw_guidance(config, len(x0)).to(x0.device)
            if teacher is not None and pairs is None:
                scales = 1.0 if guidance is None else guidance
                taught, inside = teacher.velocity(unpack(noisy, grid), t, texts, guidance_scale=scales)
                share = config.teacher_weight * inside.float()[:, None, None]
                target = share * pack(taught) + (1 - share) * target
            with autocast(config.mixed_precision, x0.device):
                prediction = predict_velocity(transformer, noisy, t, (sequence, pooled), text_ids, ids, guidance)
            token_weight = None
            if coverage is not None:
                token_weight = 1.0 + config.object_weight * coverage[index].to(prediction.device)
            loss = flow_loss(prediction, target, t, config.loss_weighting, token_weight)
            flow, term = loss.item(), None
            if grounding is not None and grounding.active:
                term = grounding.loss(index, texts)
                loss = loss + grounding.weight * term
            if alignment is not None:
                aligned = alignment.loss(teacher.features)
                loss = loss + config.feature_weight * aligned
                term_values = {"align": aligned.item()}
            else:
                term_values = {}
            if term is not None:
                term_values["grounding"] = term.item()
            log.add({"diffusion": flow, **term_values})
            set_learning_rate(optimizer, clock.learning_rate(step, base_lr=config.lr, warmup=config.warmup))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema_update(list(zip(emas, live, strict=True)), step, config.ema_decay)
            step += 1
            bar.update(1)
            bar.set_postfix(log.postfix())
            if step % config.probe_every == 0 or step == config.steps:
                accuracy = probe_single_objects(
                    build_pipeline(vae, emas[1], emas[2], emas[0], config),
                    config.probe_steps,
                    guidance_scale=5.0,
                )
                history.append(log.probe_entry(step, clock.minutes(), accuracy))
                logger.info("flux: step %d loss %.4f probe %.1f%%", step, history[-1]["loss"], accuracy * 100)
            if step % config.checkpoint_every == 0:
                save_checkpoint(
                    checkpoint,
                    {
                        "modules": [m.state_dict() for m in live],
                        "emas": [m.state_dict() for m in emas],
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "minutes": clock.minutes(),
                        "history": history,
                        "rng": rng_state(),
                        **(
                            {"projector": accelerator.unwrap_model(alignment.projector).state_dict()}
                            if alignment is not None
                            else {}
                        ),
                    },
                )
    bar.close()
    pipeline = build_pipeline(vae, emas[1], emas[2], emas[0], config)
    export = out / "pipeline"
    pipeline.to(torch.float16).save_pretrained(export)
    metrics = {
        "steps": step,
        "minutes": clock.minutes(),
        **log.final(),
        "history": history,
        "transformer_params_m": sum(p.numel() for p in emas[0].parameters()) / 1e6,
    }
    (out / "flux_metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("exported %s", export)
    return metrics


def transformer_budget(config: Config, spent: float, started: float | None) -> float:
    """The transformer stage's minutes: ``--minutes``, or less when ``--total-minutes`` leaves less room after the
    stages before it (``spent``: the stage's minutes from its checkpoint, which this invocation does not repeat)."""
    if config.total_minutes <= 0 or started is None:
        return config.minutes
    room = config.total_minutes - (time.perf_counter() - started) / 60
    budget = max(0.0, min(config.minutes, spent + room))
    if budget < config.minutes:
        logger.warning(
            "flux: %.1f of `--total-minutes` %g are left: the transformer stage gets %.1f minutes, not `--minutes` %g",
            max(0.0, room),
            config.total_minutes,
            budget,
            config.minutes,
        )
    return budget


def main(argv: list[str] | None = None) -> None:
    config, args, out, accelerator = start_shapes_run(Config, __doc__, argv)
    started = time.perf_counter()
    if config.total_minutes < 0:
        raise ValueError(f"`--total-minutes` must be >= 0 (0: no cap), got {config.total_minutes}")
    if config.loss_weighting not in ("velocity", "x0"):
        raise ValueError(f"`--loss-weighting` must be 'velocity' or 'x0', got {config.loss_weighting!r}")
    if config.sequence_encoder not in ("t5", "teacher-clip"):
        raise ValueError(f"`--sequence-encoder` must be 't5' or 'teacher-clip', got {config.sequence_encoder!r}")
    if config.feature_weight < 0 or (config.feature_weight > 0 and not config.teacher):
        raise ValueError(f"`--feature-weight` needs `--teacher` and a weight >= 0, got {config.feature_weight}")
    if config.sequence_encoder != "t5" and not config.teacher:
        raise ValueError(f"`--sequence-encoder {config.sequence_encoder}` needs `--teacher`")
    if config.guidance_min or config.guidance_max:
        if not config.teacher:
            raise ValueError("`--guidance-min`/`--guidance-max` distil a teacher's guidance: name `--teacher`")
        if not 1.0 <= config.guidance_min <= config.guidance_max:
            raise ValueError(
                f"need 1 <= `--guidance-min` <= `--guidance-max`, got {config.guidance_min} and {config.guidance_max}"
            )
    if config.reflow_pairs:
        if config.guidance_max <= 0 or config.feature_weight > 0:
            raise ValueError(
                "`--reflow-pairs` samples the teacher's guided field: it needs `--teacher` with `--guidance-min/max`, "
                "and no `--feature-weight` (no teacher pass during training)"
            )
        if config.grounding_weight > 0 or config.object_weight > 0 or config.region_fraction > 0:
            raise ValueError(
                "`--reflow-pairs` trains on the teacher's samples, not the pool's scenes: `--grounding-weight`, "
                "`--object-weight` and `--region-fraction` read the scenes' masks, so they cannot be combined with it"
            )
        if config.reflow_captions_per_noise < 1:
            raise ValueError(f"`--reflow-captions-per-noise` must be >= 1, got {config.reflow_captions_per_noise}")
        if not 0 < config.reflow_pairs <= config.pool_size or config.reflow_steps < 1:
            raise ValueError(
                f"need 0 < `--reflow-pairs` <= `--pool-size` ({config.pool_size}) and `--reflow-steps` >= 1, got "
                f"{config.reflow_pairs} and {config.reflow_steps}"
            )
    if not 0.0 <= config.reflow_data_below < 1.0 or (config.reflow_data_below > 0 and not config.reflow_pairs):
        raise ValueError(
            f"`--reflow-data-below` is a flow time in [0, 1) and needs `--reflow-pairs`, got {config.reflow_data_below}"
        )
    if not 0.0 <= config.teacher_weight <= 1.0:
        raise ValueError(f"`--teacher-weight` must be between 0 and 1, got {config.teacher_weight}")
    if config.teacher:
        if config.vae:
            raise ValueError("`--vae` and `--teacher` exclude each other: the student uses the teacher's autoencoder")
        vae_path = None
    elif config.vae:
        vae_path = Path(config.vae)
        if not (vae_path / "config.json").exists():
            raise FileNotFoundError(f"`--vae` {vae_path} is not a saved AutoencoderKL folder")
    else:
        vae_path = train_vae(config, accelerator, resume=args.resume)
    train_transformer(config, accelerator, out, vae_path, args.resume, started)
    logger.info("done in %.1f minutes", (time.perf_counter() - started) / 60)
    finish_processes()


if __name__ == "__main__":
    main()
