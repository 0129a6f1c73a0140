"""The model runner: turns a SchedulerOutput into a forward pass and sampled tokens."""
