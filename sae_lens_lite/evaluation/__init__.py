"""Evaluation: reconstruction metrics with the SAE spliced in (evaluate), PCA/VAE baselines,
reports, several SAEs side by side (compare), k-sparse probing and absorption (probe)."""
