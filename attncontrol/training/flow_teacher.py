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

import itertools
import logging

import torch

from attncontrol.training.shapes_text import TEXT_HIDDEN

logger = logging.getLogger("attncontrol.training.flow_teacher")

# The SD shapes UNet's last cross-attention block at 16x16 (up_blocks: 8x8 -> 16x16 -> 32x32).
FEATURE_MODULE = "up_blocks.1.attentions.1"


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
        self.features: torch.Tensor | None = None
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

    def watch_features(self, module: str = FEATURE_MODULE) -> int:
        """From now on keep the output of UNet ``module`` of each :meth:`velocity` call in ``self.features``
        (``[B, C, H, W]``, the prompted rows only); returns its channel count.

        The default is the decoder's last 16x16 block, the resolution of the student's token grid, where the teacher
        has already decided what goes where: the target of the student's feature alignment (``--feature-weight``).
        """
        block = dict(self.unet.named_modules())[module]

        def keep(_module, _inputs, output) -> None:
            self.features = (
                output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
            )

        block.register_forward_hook(keep)
        # A Transformer2DModel's output has its input's channels (its proj_in takes them), a ResNet block its own.
        return int(block.in_channels if hasattr(block, "in_channels") else block.out_channels)

    def to(self, device: torch.device | str) -> FlowTeacher:
        """Move the teacher's networks (the accelerator's device when training there); the schedule stays on the CPU."""
        for module in (self.unet, self.text_encoder, self.vae):
            module.to(device)
        return self

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
    def velocity(
        self, noisy: torch.Tensor, t: torch.Tensor, texts: list[str], guidance_scale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``noisy``: flow latents ``[B, C, H, W]`` at times ``t`` ``[B]``. Returns the teacher's ``eps - x0`` and a
        ``[B]`` mask of the rows it has a target for (the others should use the data).

        ``guidance_scale`` (a number or one per row) other than 1 returns the classifier-free-guided velocity
        ``u + w (c - u)``, from one UNet pass over the conditional and the empty-prompt rows together: the target of
        a guidance-distilled student, which then samples in one pass per step as FLUX.1-dev does. The mix is taken
        on the UNet's output; the velocity is affine in it with the same sample, so that equals mixing velocities.

        Times noisier than the teacher's last step (t > 0.936 for SD's schedule) are where sampling decides what goes
        where; a v-prediction teacher still gives them a target: its clean-latent estimate at its noisiest step, and
        ``v = (x_t - x0) / t``. Times cleaner than its first step are left to the data.
        """
        device = noisy.device
        # The schedule lookup runs on the CPU (its table lives there); the results go where the latents are.
        timesteps, inside = self.timesteps(t.detach().cpu())
        coefficients = self._coefficients(timesteps).to(device)
        above = ~inside & (t.detach().cpu() > 0.5)
        timesteps, inside, above = timesteps.to(device), inside.to(device), above.to(device)
        scale = torch.rsqrt((1 - t) ** 2 + t**2)[:, None, None, None]
        sample = noisy * scale
        hidden = self.encode(texts, device)
        scales = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device).expand(len(t))
        if (scales != 1.0).any():
            empty = self.encode([""], device).expand_as(hidden)
            both = self.unet(
                torch.cat([sample, sample]), timesteps.repeat(2), torch.cat([hidden, empty])
            ).sample.float()
            conditional, unconditional = both.chunk(2)
            if self.features is not None:  # watched: keep the prompted half
                self.features = self.features[: len(t)]
            output = unconditional + scales[:, None, None, None] * (conditional - unconditional)
        else:
            output = self.unet(sample, timesteps, hidden).sample.float()
        # The teacher's own coefficients at its (clamped) timestep: the flow time's exactly where it is inside.
        exact = torch.stack([1 - t, t], dim=-1) * scale[:, :, 0, 0]
        alpha, sigma = torch.where(inside[:, None], exact, coefficients.to(exact.dtype)).unbind(-1)
        alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
        if self.prediction_type == "v_prediction":
            x0, eps = alpha * sample - sigma * output, sigma * sample + alpha * output
            from_x0 = (noisy - x0) / t[:, None, None, None]
            velocity = torch.where(above[:, None, None, None], from_x0, eps - x0)
            return velocity, inside | above
        # x0 from epsilon at the teacher's noisiest step would divide by alpha ~ 0.07: those rows stay with the data.
        x0 = (sample - sigma * output) / alpha.clamp_min(1e-4)
        return output - x0, inside

    @torch.no_grad()
    def sample(
        self, noise: torch.Tensor, texts: list[str], guidance_scale: float | torch.Tensor = 1.0, steps: int = 20
    ) -> torch.Tensor:
        """Integrate the teacher's (guided) velocity field with Euler from ``noise`` at t = 1 to t = 0: the clean
        latents the student's own sampler would reach on this field, one per noise."""
        latents = noise
        times = torch.linspace(1.0, 0.0, steps + 1)
        for now, after in itertools.pairwise(times):
            velocity, _ = self.velocity(latents, now.expand(len(latents)).to(latents.device), texts, guidance_scale)
            latents = latents + float(after - now) * velocity
        return latents

    def _coefficients(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``(alpha, sigma)`` of the teacher's schedule at (fractional) timesteps, ``[B, 2]``."""
        log_snr = torch.flip(self._log_snr, dims=[0])  # index = timestep
        position = timesteps.double().clamp(0, len(log_snr) - 1)
        low = position.floor().long().clamp(max=len(log_snr) - 2)
        value = log_snr[low] + (position - low) * (log_snr[low + 1] - log_snr[low])
        alpha_sq = torch.sigmoid(value)
        return torch.stack([alpha_sq.sqrt(), (1 - alpha_sq).sqrt()], dim=-1).float()


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
