"""Where the Hydra configs of the commands live."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR_ENV = "SAMTRAIN_CONFIG_DIR"
HYDRA_COMMANDS = ("train", "eval")  # the commands that are Hydra apps of conf/<name>.yaml


def config_dir() -> Path:
    """The Hydra config folder: ``$SAMTRAIN_CONFIG_DIR``, else ``conf/`` beside the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "conf"
    missing = [name for name in HYDRA_COMMANDS if not (path / f"{name}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(
            f"samtrain: no Hydra configs {', '.join(f'{m}.yaml' for m in missing)} in {path}; "
            f"run from a source checkout (pip install -e .) or set {CONFIG_DIR_ENV} to its conf/ folder"
        )
    return path.resolve()
