"""Training: the SAE module and its on-disk format (sae), one module per training method
(recipes/), the loss terms (loss), the loop (train) and data-parallel training (distributed)."""
