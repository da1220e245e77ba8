"""Denoising-step state and batch-row roles, shared by the controller, processors and controls.

Both are *fed* from outside the attention layers (our pipelines, a denoiser pre-forward hook, or
``callback_on_step_end``), never counted from layer calls: counting breaks with separate CFG passes, cache hooks
that skip blocks, gradient checkpointing and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

GUIDANCE_ROLES = ("uncond", "cond")


def check_guidance(guidance: str | None, name: str = "guidance") -> str | None:
    """A control's guidance-half selection: ``"cond"``, ``"uncond"`` or ``None`` (both)."""
    if guidance not in (None, *GUIDANCE_ROLES):
        raise ValueError(f"`{name}` must be 'cond', 'uncond' or None, got {guidance!r}")
    return guidance


@dataclass
class StepState:
    """Where the sampler is: step ``index`` of ``num_steps`` at model timestep ``timestep``.

    ``index`` is ``None`` when nothing told us (e.g. a denoiser called outside a pipeline); controls restricted to
    steps then treat the call as outside their range and say so once in the log.
    """

    index: int | None = None
    timestep: float | None = None
    num_steps: int | None = None

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1): ``index / num_steps``; ``None`` when either is unknown."""
        if self.index is None or not self.num_steps:
            return None
        return self.index / self.num_steps


@dataclass(frozen=True)
class RowRole:
    """What one batch row is: classifier-free-guidance half and branch (``"main"``, ``"source"``, ``"target"``...)."""

    guidance: str
    branch: str
    image: int = 0


@dataclass
class BatchLayout:
    """Roles of the rows of the batch the denoiser sees.

    The stock diffusers order is guidance-major, then prompt, then image: with two prompts (source, target), CFG and
    one image each the rows are ``[uncond/source, uncond/target, cond/source, cond/target]``.
    """

    roles: list[RowRole] = field(default_factory=list)

    @classmethod
    def standard(
        cls,
        batch_size: int,
        *,
        cfg: bool,
        branches: Sequence[str] = ("main",),
    ) -> BatchLayout:
        """The layout stock pipelines produce for ``batch_size`` rows, ``branches`` prompts in order."""
        guidance = GUIDANCE_ROLES if cfg else ("cond",)
        per_branch, remainder = divmod(batch_size, len(guidance) * len(branches))
        if remainder or per_branch == 0:
            raise ValueError(
                f"batch of {batch_size} rows cannot be split into {len(guidance)} guidance halves x "
                f"{len(branches)} branches {list(branches)}"
            )
        roles = [RowRole(g, b, i) for g in guidance for b in branches for i in range(per_branch)]
        return cls(roles)

    def __len__(self) -> int:
        return len(self.roles)

    def rows(self, *, guidance: str | None = None, branch: str | None = None) -> list[int]:
        """Indices of the rows matching ``guidance`` and ``branch`` (``None`` matches any)."""
        return [
            index
            for index, role in enumerate(self.roles)
            if (guidance is None or role.guidance == guidance) and (branch is None or role.branch == branch)
        ]

    @property
    def branches(self) -> list[str]:
        seen: dict[str, None] = {}
        for role in self.roles:
            seen.setdefault(role.branch)
        return list(seen)
