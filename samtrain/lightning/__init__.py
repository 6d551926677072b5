"""The Lightning runner: SamModule and MaeModule compose the model, the interaction and the data;
parameter groups and schedules, callbacks and fault tolerance."""
