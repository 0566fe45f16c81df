"""Data: reading sets (``records``), formats and encoding (``formats``), deterministic global
batches (``batches``), packing, and the built-in task with its tokenizer."""
