"""The data side: load a model and name its hook points (models), read and pack text (corpus),
run the model into an activation cache (harvest) and the cache's format (cache)."""
