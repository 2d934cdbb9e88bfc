"""Training: the checked setup, the DeepSpeed engine and its JSON, the optimizer and schedule, the loop,
what it logs, signal handling across launchers, and the memory plan."""
