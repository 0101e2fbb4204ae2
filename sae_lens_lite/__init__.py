"""sae_lens_lite: train, evaluate, inspect and export sparse autoencoders on LM activations."""

__version__ = "0.1.0"
