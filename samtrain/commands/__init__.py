"""The commands: train, eval, pretrain-MAE, check-data and the ``samtrain`` command line."""
