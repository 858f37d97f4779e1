"""Training: one Fabric trainer for pretraining, SFT and adaptation, and what it needs around it.

- `trainer`: `train(cfg)`: the checks, Fabric's launch and the training loop
- `batches`: where batches come from (pretraining windows, SFT examples) and the model fitted to them
- `objective`: the diffusion loss, the learning-rate schedule, validation and the sink monitor
- `run_folder`: one trainer per run folder (a lock), resume checks, `--overwrite` without loss
- `stopping`: Ctrl-C / SIGTERM and the message naming the command that continues a run
- `loggers`: metrics.jsonl and the optional Lightning loggers
- `recipes`: YAML recipes, model shortcuts and `section.key=value` overrides -> a Config
- `parallelize`: FSDP2 / activation checkpointing / compile, applied to the model from outside
"""
