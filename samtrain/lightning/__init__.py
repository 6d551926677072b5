"""The Lightning runner: SamModule and MaeModule compose the model, the interaction and the data;
parameter groups and schedules, callbacks, fault tolerance, atomic checkpoint files
(checkpoint_io) and a CSV logger that keeps a resumed run's history (loggers)."""
