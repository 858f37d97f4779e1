"""Importers of diffusion LM checkpoints from other code bases (SMDM's lit_gpt files, LLaDA and Dream
folders) into sinkdlm checkpoints, read from their tensors: none of their code is run."""
