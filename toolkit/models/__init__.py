"""Models: built-in tiny presets and loading any HF causal LM, ZeRO-3 aware."""

from toolkit.models.loading import build_model, load_for_training, load_tokenizer, resolve_model
from toolkit.models.presets import PRESETS, build_preset

__all__ = ["PRESETS", "build_model", "build_preset", "load_for_training", "load_tokenizer", "resolve_model"]
