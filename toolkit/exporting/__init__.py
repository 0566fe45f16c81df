"""Shipping a model: what a path given as a model is (``source``), bitsandbytes quantization
(``quantize``), the reload check (``probe``), the loss-budget search (``sensitivity``), and
``export``, which puts them together and writes ``export.json``."""

# The export's choices, here rather than in ``export`` so that the command line reads them without
# importing torch.
QUANT_TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
