"""A run's checkpoints: crash-safe save, verify, list, roll back and resume (``store``), and their
consolidation to a Hugging Face model (``consolidate``)."""
