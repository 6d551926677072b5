"""MAE pretraining of the SAM image encoder: `python pretrain_mae.py [group=option] [key=value]`
(see conf/mae.yaml). Writes <run dir>/mae_encoder.safetensors for `model.net.encoder_init=`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="mae")
def main(cfg: DictConfig) -> float | None:
    from samtrain.commands.pretrain_mae import pretrain

    metrics = pretrain(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
