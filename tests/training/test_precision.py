"""``--mixed-precision auto``: bf16 only where the machine computes it natively (emulated bf16 took about 9x the fp32
step time on an AVX2 CPU, which under a wall-clock budget means a tenth of the training)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest
import torch

from attncontrol.training import common


@pytest.fixture
def cpu_flags(tmp_path, monkeypatch):
    def write(*flags: str) -> None:
        info = tmp_path / "cpuinfo"
        info.write_text(
            "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse sse2 avx avx2 "
            + " ".join(flags)
            + "\n"
        )
        monkeypatch.setattr(common, "CPUINFO", info)

    return write


@pytest.mark.parametrize(
    ("flags", "native"), [((), False), (("avx512f",), False), (("amx_bf16",), True), (("avx512_bf16",), True)]
)
def test_native_bf16_is_read_from_the_cpu_flags(cpu_flags, flags, native):
    cpu_flags(*flags)
    assert common.cpu_has_native_bf16() is native


def test_cpu_info_reads_the_model_name(cpu_flags):
    cpu_flags("amx_bf16")
    model, flags = common.cpu_info()
    assert model == "Some CPU @ 2.0GHz"
    assert {"avx2", "amx_bf16"} <= flags
    # What the benchmarks and training records write as their device.
    assert common.cpu_label(2).startswith("CPU (Some CPU @ 2.0GHz, ") and "native bf16, 2 threads)" in common.cpu_label(
        2
    )
    cpu_flags()
    assert "no native bf16" in common.cpu_label(1)


def test_missing_cpuinfo_means_no_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CPUINFO", tmp_path / "absent")
    assert common.cpu_info() == ("", set())
    assert common.cpu_has_native_bf16() is False


def test_auto_picks_bf16_only_with_native_support(cpu_flags):
    cpu = torch.device("cpu")
    cpu_flags()
    assert common.resolve_mixed_precision("auto", cpu) == "no"
    cpu_flags("amx_bf16")
    assert common.resolve_mixed_precision("auto", cpu) == "bf16"
    assert common.resolve_mixed_precision("no", cpu) == "no"


def test_explicit_bf16_is_kept_with_a_warning_where_it_is_emulated(cpu_flags, caplog):
    cpu_flags()
    with caplog.at_level(logging.WARNING, logger="attncontrol.training.common"):
        assert common.resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
    assert "without native bf16" in caplog.text


def test_the_distillers_and_concepts_warning_fires_only_for_emulated_bf16(cpu_flags, caplog):
    """Their accelerate precisions ("no", "fp16", "bf16") pass through `warn_if_bf16_emulated` unresolved."""
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="attncontrol.training.common"):
        cpu_flags("amx_bf16")
        for precision in ("no", "fp16", "bf16"):
            common.warn_if_bf16_emulated(precision, cpu)
        cpu_flags()
        common.warn_if_bf16_emulated("no", cpu)
        assert caplog.text == ""
        common.warn_if_bf16_emulated("bf16", cpu)
    assert "without native bf16" in caplog.text


def test_bad_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="mixed_precision"):
        common.resolve_mixed_precision("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve"):
        common.autocast("auto", torch.device("cpu"))


@dataclass
class _Run:
    out: str = "runs/x"  # output folder
    seed: int = 0  # seed
    mixed_precision: str = "auto"  # precision


def test_the_run_records_the_precision_it_resolved(cpu_flags, tmp_path):
    cpu_flags()
    config, _, out, _ = common.start_shapes_run(_Run, "doc", ["--out", str(tmp_path / "run")])
    assert config.mixed_precision == "no"
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "no"
