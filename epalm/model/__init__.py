"""Plain-PyTorch model code: the frozen OPT and encoders, the trainable connection and soft prompt.

Nothing here imports deepspeed or torch.distributed, reads environment variables or parses YAML.
"""
