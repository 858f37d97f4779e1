"""Importers of diffusion LM checkpoints from other code bases into sinkdlm checkpoints."""
