"""Training: DDP/optimizer wrapping, the train step, schedules, checkpoints and the driver."""
