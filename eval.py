"""Evaluate SAM checkpoints: `python eval.py checkpoints=[a.pth,b.ckpt] [key=value ...]` (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from samtrain.commands.eval import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
