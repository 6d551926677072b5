"""README.md's examples hold: every samtrain name it mentions exists, every Python import in its
code blocks works, and every training, evaluation and MAE command line composes with Hydra."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF, ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
# Entry points and the config each composes.
ENTRY_POINTS = {
    ("python", "train.py"): "train",
    ("samtrain", "train"): "train",
    ("python", "eval.py"): "eval",
    ("samtrain", "eval"): "eval",
    ("python", "pretrain_mae.py"): "mae",
}


def resolve(dotted: str) -> object:
    """The module or attribute a dotted samtrain name refers to (ImportError/AttributeError if none)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(dotted)


def dotted_names() -> list[str]:
    names = re.findall(r"\bsamtrain(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README)
    return sorted({n.rstrip(".") for n in names})


@pytest.mark.parametrize("name", dotted_names())
def test_every_samtrain_name_in_the_readme_exists(name):
    resolve(name)


def python_imports() -> list[tuple[str, str]]:
    found = []
    for lang, body in BLOCKS:
        if lang != "python":
            continue
        for module, names in re.findall(r"^from (samtrain[\w.]*) import ([^#\n]+)", body, flags=re.M):
            found += [(module, n.strip()) for n in names.split(",") if n.strip()]
    return found


@pytest.mark.parametrize(("module", "name"), python_imports())
def test_every_import_in_the_readme_works(module, name):
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


def command_lines() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every command line in the README's shell blocks."""
    found = []
    for lang, body in BLOCKS:
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(("python ", "samtrain ")):
                continue
            words = shlex.split(line, comments=True)
            config = ENTRY_POINTS.get(tuple(words[:2]))
            if config is None or "--help" in words or "--cfg" in words:
                continue
            overrides = [
                re.sub(r"<[^>]*>", "placeholder", w) for w in words[2:] if "=" in w and not w.startswith("-")
            ]
            found.append((config, overrides))
    return found


@pytest.mark.parametrize(
    ("config", "overrides"), command_lines(), ids=lambda v: v if isinstance(v, str) else " ".join(v)
)
def test_every_command_line_in_the_readme_composes(config, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        compose(config, overrides=overrides)
