"""Which layers an export keeps in full precision so that its eval loss stays within a budget.

Quantization hurts some layers far more than others. Given an eval set and a budget (the largest
relative rise of eval loss), :func:`layers_to_keep` quantizes the model once, scores it, measures
for every quantized layer how much putting its full-precision original back lowers the loss,
then puts layers back, most helpful first, until the budget holds. That costs one eval pass per
quantized layer, plus one per layer kept. The search runs on a quantized copy of its own: the
export quantizes afresh with the chosen layers in ``keep_fp`` and saves before that copy has run
anything (see ``toolkit.exporting.quantize`` on why a forward pass must not come first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from toolkit import inference
from toolkit.errors import UserError
from toolkit.exporting.quantize import quantized_modules


@dataclass
class KeepSearch:
    """The outcome of :func:`layers_to_keep`; losses are eval-set token means."""

    budget: float  # largest relative eval-loss rise allowed
    source_loss: float
    all_quantized_loss: float
    kept: list[str] = field(default_factory=list)  # in the order they were put back
    final_loss: float | None = None
    # what putting each quantized layer back alone lowered the loss by, largest first
    gains: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _rise(loss: float, source_loss: float) -> float:
    return loss / source_loss - 1


def layers_to_keep(model_dir, quantization_config, source, evaluation, source_loss: float, budget: float,
                   trust_remote_code: bool = False) -> KeepSearch:
    """Find the fewest layers (by that greedy order) to leave unquantized for ``budget``.

    Args:
        model_dir: the full-precision model directory.
        quantization_config: the export's ``BitsAndBytesConfig``.
        source: the full-precision model, loaded (a ``toolkit.inference.LoadedModel``); its
            layers are lent to the quantized copy while that is scored.
        evaluation: ``(records, fields)`` of the eval set.
        source_loss: the full-precision model's eval loss on it.
        budget: largest relative eval-loss rise, e.g. 0.03.

    Raises:
        UserError: the budget holds only with every layer in full precision.
    """

    records, fields = evaluation

    def loss(loaded) -> float:
        return inference.evaluate(loaded, records, fields=fields, answer_match=False).loss

    trial = inference.load(model_dir, quantization_config=quantization_config, trust_remote_code=trust_remote_code)
    search = KeepSearch(budget, source_loss, loss(trial))
    search.final_loss = search.all_quantized_loss
    if _rise(search.final_loss, source_loss) <= budget:
        return search
    quantized = quantized_modules(trial.model)
    originals = dict(source.model.named_modules())

    def put(name: str, module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(trial.model.get_submodule(parent), child, module)

    for name, module in quantized.items():
        put(name, originals[name])
        search.gains[name] = search.all_quantized_loss - loss(trial)
        put(name, module)
    search.gains = dict(sorted(search.gains.items(), key=lambda item: -item[1]))
    for name in list(search.gains)[:-1]:  # with every layer kept there would be nothing to export
        put(name, originals[name])
        search.kept.append(name)
        search.final_loss = loss(trial)
        if _rise(search.final_loss, source_loss) <= budget:
            return search
    raise UserError(f"the eval loss rises {_rise(search.all_quantized_loss, source_loss):.1%} quantized and no "
                    f"set of layers left in full precision keeps it within {budget:.1%} while quantizing any",
                    "raise --max-loss-rise, or use --quant int8")
