"""Scripts run as ``python benchmarks/x.py`` put their own folder first on ``sys.path``, so a script named like an
installed top-level module hides that module from every library the script imports. ``benchmarks/kernels.py`` did
this to Hugging Face's ``kernels`` (installed with transformers 5): diffusers' peft loader imported the benchmark
instead, and every benchmark that loads a pipeline failed."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = [ROOT / "benchmarks", ROOT / "scripts", ROOT / "examples"]


def installed_top_level_modules() -> set[str]:
    folders = {str(folder) for folder in SCRIPT_FOLDERS}
    return {
        module.name
        for module in pkgutil.iter_modules()
        if str(getattr(module.module_finder, "path", "")) not in folders
    }


@pytest.mark.parametrize("folder", SCRIPT_FOLDERS, ids=lambda folder: folder.name)
def test_no_script_shadows_an_installed_module(folder: Path) -> None:
    installed = installed_top_level_modules()
    clashes = sorted(path.name for path in folder.glob("*.py") if path.stem in installed)
    assert not clashes, f"{folder.name}/{clashes} would hide installed modules of the same name; rename them"


def test_the_check_sees_installed_modules() -> None:
    # The test above is only as good as this list: it must hold what a script could shadow.
    installed = installed_top_level_modules()
    assert {"torch", "diffusers", "json"} <= installed
