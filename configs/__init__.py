"""Training configs (ml_collections); load one with ``--config configs/<name>.py[:tiny]``."""
