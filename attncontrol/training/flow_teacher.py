"""A trained SD-architecture model as the teacher of a rectified-flow (Flux-architecture) student.

A small transformer trained from data alone on 2 CPU cores learns the shapes world's objects but not their colours
(``benchmarks/results/shapes-training-attempts-cpu.md``): the regression target ``noise - x0`` is mostly noise, and
the little of it that says "red" is what a small model learns last. The shipped UNet already binds colour and shape;
its prediction at the same noisy latent is the *expected* velocity, with the noise averaged out, so the student
regresses onto a far less noisy target (output-level knowledge distillation, as LinFusion and CLEAR distil their
students).

The two models share the latent space (the teacher's autoencoder and scaling, no shift), and a flow time ``t`` maps
onto the teacher's variance-preserving schedule exactly: ``x_t = (1 - t) x0 + t eps`` scaled by
``c = 1 / sqrt((1 - t)^2 + t^2)`` is ``alpha x0 + sigma eps`` with ``alpha = (1 - t) c`` and ``sigma = t c``; the
teacher's timestep is the (fractional) one whose signal-to-noise ratio equals ``((1 - t) / t)^2``.
"""

from __future__ import annotations

import logging

import torch

from attncontrol.training.shapes_text import TEXT_HIDDEN

logger = logging.getLogger("attncontrol.training.flow_teacher")


class FlowTeacher:
    """Velocity targets ``eps - x0`` for flow-matching latents, predicted by a v- or epsilon-prediction UNet."""

    def __init__(self, pipeline):
        # fp32 throughout: on this project's CPU the UNet's forward pass ran 20x slower under bf16 autocast.
        self.unet = pipeline.unet.float().eval().requires_grad_(False)
        self.text_encoder = pipeline.text_encoder.float().eval().requires_grad_(False)
        self.tokenizer = pipeline.tokenizer
        self.vae = pipeline.vae.float().eval().requires_grad_(False)
        self.prediction_type = pipeline.scheduler.config.prediction_type
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"the teacher's scheduler predicts {self.prediction_type!r}; need v_prediction or epsilon")
        alphas = torch.cumprod(1.0 - pipeline.scheduler.betas.double(), dim=0)
        # log SNR falls with the timestep; flipped so that it rises, as torch.searchsorted needs.
        self._log_snr = torch.flip(torch.log(alphas / (1.0 - alphas)), dims=[0])

    @classmethod
    def from_pretrained(cls, path: str) -> FlowTeacher:
        from diffusers import StableDiffusionPipeline

        from attncontrol.models import SHIPPED_MODELS

        source = SHIPPED_MODELS.get(path, path)
        pipeline = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None)
        logger.info("teacher: %s (%s)", source, pipeline.scheduler.config.prediction_type)
        return cls(pipeline)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def timesteps(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's fractional timestep for each flow time, and whether it lies inside the teacher's range."""
        log_snr = 2.0 * (torch.log1p(-t.double()) - torch.log(t.double()))
        table = self._log_snr
        inside = (log_snr >= table[0]) & (log_snr <= table[-1])
        clamped = log_snr.clamp(float(table[0]), float(table[-1]))
        upper = torch.searchsorted(table, clamped).clamp(1, len(table) - 1)
        low, high = table[upper - 1], table[upper]
        position = (upper - 1).double() + (clamped - low) / (high - low)
        # Index i of the flipped table is timestep (N - 1 - i).
        return (len(table) - 1 - position).float(), inside

    @torch.no_grad()
    def encode(self, texts: list[str], device) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def velocity(self, noisy: torch.Tensor, t: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``noisy``: flow latents ``[B, C, H, W]`` at times ``t`` ``[B]``. Returns the teacher's ``eps - x0`` and a
        ``[B]`` mask of the rows whose time lies inside the teacher's schedule (the others should use the data)."""
        timesteps, inside = self.timesteps(t)
        scale = torch.rsqrt((1 - t) ** 2 + t**2)[:, None, None, None]
        alpha, sigma = (1 - t)[:, None, None, None] * scale, t[:, None, None, None] * scale
        sample = noisy * scale
        output = self.unet(sample, timesteps.to(noisy.device), self.encode(texts, noisy.device)).sample.float()
        if self.prediction_type == "v_prediction":
            x0, eps = alpha * sample - sigma * output, sigma * sample + alpha * output
        else:
            eps = output
            x0 = (sample - sigma * eps) / alpha.clamp_min(1e-4)
        return eps - x0, inside.to(noisy.device)


def student_text_encoder(teacher_encoder, vocab_size: int, max_length: int):
    """The teacher's CLIP text encoder cut to the student's vocabulary and prompt length, outputs unchanged.

    The shapes tokenizers keep CLIP's first ``vocab_size - 2`` tokens under their own ids and move the two specials
    to the end (:func:`attncontrol.testing.tiny.clip_tokenizer`), and CLIP is causal, so copying those embedding rows
    and the first ``max_length`` positions gives the same hidden states for every prompt that fits, in a table a
    third the size and at 32 positions instead of 77.
    """
    from attncontrol.training.shapes_text import shapes_clip_text_encoder

    config = teacher_encoder.config
    if config.hidden_size != TEXT_HIDDEN:
        raise ValueError(f"the teacher's text encoder has hidden size {config.hidden_size}, the student {TEXT_HIDDEN}")
    student = shapes_clip_text_encoder(config.num_hidden_layers, vocab_size, max_length)
    state = {k: v.clone() for k, v in teacher_encoder.state_dict().items()}
    tokens = state["embeddings.token_embedding.weight"]
    specials = tokens[[config.bos_token_id, config.eos_token_id]]
    state["embeddings.token_embedding.weight"] = torch.cat([tokens[: vocab_size - 2], specials])
    positions = state["embeddings.position_embedding.weight"]
    state["embeddings.position_embedding.weight"] = positions[:max_length]
    state.pop("embeddings.position_ids", None)
    student.load_state_dict(state)
    return student
