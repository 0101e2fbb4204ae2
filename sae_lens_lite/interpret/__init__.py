"""Interpretation: top activations and statistics (analyze), explanations (explain, contexts),
the features.json schema (features), the HTML page (browser/), steering and attribution
(intervene, sweep)."""
