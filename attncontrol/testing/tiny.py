"""Tiny diffusers pipelines of every family attncontrol supports, built offline from small configs.

Each factory seeds torch before each component (as diffusers' own tests do), so the same call gives the same
weights on every machine. The CLIP tokenizer is the real 49,408-token BPE committed under ``assets/``; the T5
tokenizer is a small Unigram model over CLIP's whole-word vocabulary, good enough to exercise the T5 code path.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_MAX_LENGTH = 77


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    folder = ASSETS / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return vocab, merges


def _truncated_vocab_and_merges(vocab_size: int | None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE cut to its first ``vocab_size`` tokens: 512 byte tokens, the earliest merges, the two specials.

    CLIP numbers token ``512 + i`` as the result of merge ``i``, so dropping the late merges leaves a consistent,
    smaller BPE that still spells every text (rare words fall into more pieces). The shapes models use it to keep
    the embedding table, the largest part of a small text encoder, from dominating the shipped weights.
    """
    vocab, merges = _clip_vocab_and_merges()
    if vocab_size is None or vocab_size >= len(vocab):
        return dict(vocab), list(merges)
    if vocab_size < 1024:
        raise ValueError(f"`vocab_size` must be at least 1024 (512 byte tokens, merges, 2 specials), got {vocab_size}")
    num_merges = vocab_size - 512 - 2
    kept = {token: index for token, index in vocab.items() if index < 512 + num_merges}
    kept["<|startoftext|>"] = vocab_size - 2
    kept["<|endoftext|>"] = vocab_size - 1
    return kept, list(merges[:num_merges])


def clip_tokenizer(vocab_size: int | None = None, max_length: int = CLIP_MAX_LENGTH):
    """The real CLIP BPE tokenizer (SD 1.x/2.x, SDXL, Flux and SD3 all use it), built from committed files.

    ``vocab_size`` keeps only the first tokens (see ``_truncated_vocab_and_merges``); ``max_length`` is the padded
    length pipelines encode to.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _truncated_vocab_and_merges(vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(vocab_size: int | None = None, max_length: int = 512):
    """A small offline T5 (Unigram) tokenizer whose pieces are the lowercase whole words of (truncated) CLIP."""
    from transformers import T5Tokenizer

    vocab, _ = _truncated_vocab_and_merges(vocab_size)
    words = sorted(
        {token[:-4] for token in vocab if token.endswith("</w>") and re.fullmatch(r"[a-z]+", token[:-4])},
        key=lambda word: (len(word), word),
    )
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(letter, -10.0) for letter in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + word, -1.0 - len(word) * 0.01) for word in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_config(
    hidden_size: int = 32,
    *,
    intermediate_size: int = 37,
    projection_dim: int = 32,
    vocab_size: int = 49408,
    max_length: int = CLIP_MAX_LENGTH,
    num_layers: int = 2,
):
    """A small CLIP text-encoder config over the real BPE vocabulary, or its first ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )


def _eval(pipeline):
    """Freshly built modules start in train mode (T5 has dropout); pipelines loaded from disk are in eval mode."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def _t5_encoder(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab_size = len(t5_tokenizer())
    config = T5Config(d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=vocab_size)
    return T5EncoderModel(config)


def small_autoencoder(
    *, latent_channels: int = 4, sample_size: int = 32, block_out_channels: tuple[int, ...] = (32, 64), **extra
):
    """AutoencoderKL with one layer per block: the tiny models' and the shapes models' VAE.

    The default channels (32, 64) give a factor-2 latent; each further block halves it again."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        **extra,
    )


def _vae(latent_channels: int, seed: int, **extra):
    torch.manual_seed(seed)
    return small_autoencoder(latent_channels=latent_channels, **extra)


def tiny_sd_pipeline(seed: int = 0):
    """SD1.5-shaped ``StableDiffusionPipeline``: self- and cross-attention at two resolutions plus the mid block.

    VAE factor 2: a 32x32 image has a 16x16 latent, attention runs at 16x16 and 8x8.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    vae = _vae(4, seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return _eval(
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL-shaped ``StableDiffusionXLPipeline``: two text encoders, add-time embeddings, 2 transformer blocks deep."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = _vae(4, seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return _eval(
        StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    )


def tiny_flux_pipeline(seed: int = 0):
    """Flux-shaped ``FluxPipeline``: two dual-stream and two single-stream blocks, CLIP + T5 text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    vae = _vae(4, seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config())
    text_encoder_2 = _t5_encoder(32, seed)
    return _eval(
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=t5_tokenizer(),
            transformer=transformer,
        )
    )


def tiny_sd3_pipeline(seed: int = 0):
    """SD3.5-shaped ``StableDiffusion3Pipeline``: joint blocks (image first), qk RMS-norm, one dual-attention layer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    vae = _vae(4, seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config())
    text_encoder_3 = _t5_encoder(64, seed)
    return _eval(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=text_encoder_3,
            tokenizer_3=t5_tokenizer(),
        )
    )
