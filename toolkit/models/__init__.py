"""Models: loading any HF causal LM (ZeRO-3 aware), the built-in tiny presets, LoRA/QLoRA, packed
attention, the pipeline conversion, and ``build.py``: the module a recipe trains."""
