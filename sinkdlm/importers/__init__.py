"""Importers of published diffusion LMs whose layouts transformers cannot load without their own code."""
