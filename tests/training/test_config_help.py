"""Every training flag's ``--help`` comes from the comment beside its config field (one place for each setting)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from attncontrol.training import concepts, distill_clear, distill_linfusion, shapes_flux, shapes_sd
from attncontrol.training.common import field_comments, parse_config


@dataclass
class _Base:
    # Above, over
    # two lines.
    first: int = 1
    second: str = "a # not a comment"  # trailing
    third: float = 0.5

    # A blank line separates this from ``fourth``, which has no comment.

    fourth: int = 4


@dataclass
class _Child(_Base):
    first: int = 2  # the subclass's own words win
    second: str = "b"


def test_field_comments_reads_lines_above_trailing_comments_and_inherits():
    assert field_comments(_Child) == {
        "first": "the subclass's own words win",
        "second": "trailing",  # the string's '#' is not a comment; the base's comment is inherited
    }
    assert field_comments(_Base) == {"first": "Above, over two lines.", "second": "trailing"}


def test_help_shows_comment_and_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Child, "doc", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--first FIRST the subclass's own words win (default: 2)" in text
    assert "--third THIRD (default: 0.5)" in text


@pytest.mark.parametrize(
    "config_cls",
    [shapes_sd.Config, shapes_flux.Config, concepts.Config, distill_linfusion.Config, distill_clear.Config],
    ids=["shapes_sd", "shapes_flux", "concepts", "distill_linfusion", "distill_clear"],
)
def test_every_training_flag_is_explained(config_cls):
    missing = {item.name for item in fields(config_cls)} - set(field_comments(config_cls))
    assert not missing, f"fields without a comment (their --help would be empty): {sorted(missing)}"


def test_shapes_sd_help_reads_the_recipe_comments(capsys):
    with pytest.raises(SystemExit):
        shapes_sd.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Share of the captioned rows trained through the regional control's hard masks" in text
    assert "(default: 0.35)" in text
