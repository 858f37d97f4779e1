"""Training: one Fabric trainer for pretraining, SFT and adaptation, and what it needs around it.

- `trainer`: the training loop, the run folder's lifecycle (lock, resume checks, checkpoints), loggers
- `recipes`: YAML recipes, model shortcuts and `section.key=value` overrides -> a Config
- `parallelize`: FSDP2 / activation checkpointing / compile, applied to the model from outside
"""
