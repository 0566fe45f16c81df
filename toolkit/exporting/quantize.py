"""bitsandbytes quantization for export: the config, a save that cannot write damaged weights, and
a check of every quantized weight against its full-precision source.

Why saving is guarded (bitsandbytes 0.50.2): on a CPU with AVX512-BF16, the first inference
forward pass of a ``Linear4bit`` repacks its weight for the fused CPU kernel
(``Linear4bit.forward`` → ``functional._convert_weight_packed_for_cpu``), replacing
``quant_state.absmax`` by a transposed ``(in/blocksize, out)`` bfloat16 copy and dequantizing the
nested absmax of double quantization. ``Linear4bit._save_to_state_dict`` undoes this with
``_convert_weight_packed_for_cpu_inverse``, in place, and that inverse is lossy: without double
quantization it never transposes absmax back nor restores float32, so every block is written with
another block's scale; with double quantization it re-quantizes the bf16-rounded absmax around a
new offset (about 0.1% off). The live module keeps the damaged state, so a reload matches it
exactly and only a comparison with the source can see it. Hence: a quantized model is saved before
it has run any forward pass (:func:`save_quantized` refuses a packed one), and
:func:`weight_errors` holds every block scale and dequantized weight to the bound that
round-to-nearest quantization of its source allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import torch
import transformers
from safetensors import safe_open
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from toolkit.errors import UserError

_INT8_HALF_STEP = 0.5 / 127  # LLM.int8 rounds weight / row_absmax * 127 to the nearest integer
_SCALE_EPS = 1e-6  # a float32 absmax is exact; this covers arithmetic on the way to it


@dataclass(frozen=True)
class WeightError:
    """How far the quantized weights are from their source, over all quantized modules.

    Attributes:
        max_step_ratio: the largest error of any weight or block scale against its source, in
            units of the most that round-to-nearest allows for it (see :func:`weight_errors`).
            At most 1 for a faithful quantization.
        worst_module: the module where ``max_step_ratio`` was found.
        mean_relative: mean over modules of ||dequantized - source|| / ||source||.
        modules: number of quantized modules checked.
    """

    max_step_ratio: float
    worst_module: str
    mean_relative: float
    modules: int


def bnb_config(quant: str, *, double_quant: bool, keep_fp: tuple[str, ...], compute_dtype: str) -> BitsAndBytesConfig:
    """The transformers ``BitsAndBytesConfig`` for one quant type.

    Args:
        quant: ``nf4``, ``fp4`` (4-bit, blockwise 64) or ``int8`` (LLM.int8, per-row scales).
        double_quant: also quantize the 4-bit block scales (8-bit, blocks of 256).
        keep_fp: module names left in full precision (``lm_head`` by default).
        compute_dtype: dtype 4-bit layers compute in: ``float32``, ``bfloat16`` or ``float16``.
    """
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep_fp))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        llm_int8_skip_modules=list(keep_fp),
    )


def versions() -> dict:
    """Versions of the libraries that decide the exported format."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bnb.__version__}


def quantized_modules(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The bitsandbytes linear layers of a model, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


def save_quantized(model: PreTrainedModel, out_dir: Path) -> None:
    """``save_pretrained`` (safetensors) a quantized model that has not been repacked by a forward pass.

    Raises:
        RuntimeError: a 4-bit layer is in the CPU-packed layout; saving it would write wrong block
            scales (see the module docstring). Quantize again and save before any forward pass.
    """
    _refuse_packed(model, "bitsandbytes cannot save them faithfully, so save before running the model")
    model.save_pretrained(out_dir)


def weight_errors(quantized: PreTrainedModel, source: PreTrainedModel) -> WeightError:
    """Compare every quantized weight and block scale with the full-precision weight it was made from.

    Raises:
        RuntimeError: a 4-bit layer is in the CPU-packed layout, which cannot be dequantized here;
            check before the model's first forward pass.
    """
    _refuse_packed(quantized, "check the weights before running the model")
    source_modules = dict(source.named_modules())
    worst, worst_name, relative = 0.0, "", []
    for name, module in quantized_modules(quantized).items():
        reference = source_modules[name].weight.detach().float()
        if isinstance(source_modules[name], Conv1D):
            reference = reference.T  # GPT-2's Conv1D stores (in, out); transformers quantizes (out, in)
        dequantized, ratio = _step_ratio(module, reference)
        if ratio > worst:
            worst, worst_name = ratio, name
        relative.append(((dequantized - reference).norm() / reference.norm().clamp_min(1e-30)).item())
    if not relative:
        raise UserError("no linear layer was quantized", "check keep_fp: it may name every layer")
    return WeightError(worst, worst_name, sum(relative) / len(relative), len(relative))


def _refuse_packed(model: PreTrainedModel, fix: str) -> None:
    packed = [
        name
        for name, module in quantized_modules(model).items()
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if packed:
        raise RuntimeError(f"{len(packed)} 4-bit layers (first: {packed[0]}) were repacked by a CPU forward pass; {fix}")


def _step_ratio(module: torch.nn.Module, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The module's dequantized weight, and its worst error in units of what round-to-nearest allows.

    Weights are quantized in groups (4-bit: blocks of ``blocksize`` consecutive elements; int8:
    rows), each scaled by the group's absmax. Round-to-nearest then bounds two things, both checked:
    each stored scale differs from the true absmax of its group at most by its own storage error
    (float rounding; with double quantization one step of the 8-bit code), and each element at
    most by half the widest code step times the true scale, plus the stored scale's error, plus
    rounding of the dequantized value. Scales written to the wrong blocks break the first bound.
    """
    weight = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        # Before the first forward the row scales live on the weight, after it on the layer state.
        stored = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        dequantized = bnb_f.int8_vectorwise_dequant(weight.data, stored).float()
        group = reference.shape[1]
        true = _groups(reference.abs(), group).amax(dim=1)
        half_step = _INT8_HALF_STEP
        # Int8Params quantizes an fp16 copy of the weight: scales and values carry fp16 rounding.
        value_eps = torch.finfo(torch.float16).eps
        scale_bound = value_eps * true
    else:
        state = weight.quant_state
        dequantized = bnb_f.dequantize_4bit(weight.data, state).float()
        group = state.blocksize
        true = _groups(reference.abs(), group).amax(dim=1)
        half_step, value_eps = _half_step(state.code), torch.finfo(state.dtype).eps
        stored, scale_bound = state.absmax, _SCALE_EPS * true
        if state.nested:
            stored = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
            nested_true = _groups(true - state.offset, state.state2.blocksize).abs().amax(dim=1)
            # bitsandbytes' 8-bit blockwise quantizer picks the nearest code or, near a midpoint,
            # its neighbour (measured up to 0.2% past half a step): allow one step.
            nested_bound = 2 * _half_step(state.state2.code) * nested_true
            scale_bound = scale_bound + nested_bound.repeat_interleave(state.state2.blocksize)[: true.numel()]
    scale_error = (stored.float().reshape(-1) - true).abs()  # one scale per group, in the kernel's order
    element_error = _groups((dequantized - reference).abs(), group)
    element_bound = half_step * true + scale_error + value_eps * true
    ratio = max(
        (element_error / element_bound.clamp_min(1e-30)[:, None]).max().item(),
        (scale_error / scale_bound.clamp_min(1e-30)).max().item(),
    )
    return dequantized, ratio


def _groups(values: torch.Tensor, size: int) -> torch.Tensor:
    """Flatten, pad with zeros to a multiple of ``size`` and view as (groups, size)."""
    flat = values.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // size) * size, device=flat.device, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded.view(-1, size)


def _half_step(code: torch.Tensor) -> float:
    """Half the widest gap between neighbouring values of a quantization code."""
    values = code.float().sort().values
    return (values[1:] - values[:-1]).max().item() / 2


def quantized_weight_bytes(out_dir: Path, model: PreTrainedModel) -> tuple[int, int]:
    """Bytes the quantized layers take in ``out_dir``'s safetensors files, and the same weights in fp16.

    Returns:
        ``(stored, fp16)``: stored counts each quantized weight with its scales and quant state;
        fp16 counts 2 bytes per original weight element.
    """
    modules = quantized_modules(model)
    prefixes = tuple(f"{name}." for name in modules)
    biases = {f"{name}.bias" for name in modules}
    stored = 0
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes) and key not in biases:
                    tensor_slice = f.get_slice(key)
                    stored += math.prod(tensor_slice.get_shape()) * _itemsize(tensor_slice.get_dtype())
    fp16 = sum(2 * math.prod(_original_shape(module)) for module in modules.values())
    return stored, fp16


def _original_shape(module: torch.nn.Module) -> torch.Size:
    # A 4-bit weight is stored flat and packed; its quant state keeps the (out, in) shape.
    state = getattr(module.weight, "quant_state", None)
    return state.shape if state is not None else module.weight.shape


def _itemsize(safetensors_dtype: str) -> int:
    # safetensors names dtypes by kind and bits ("F32", "BF16", "U8", "F8_E4M3"); "BOOL" is one byte.
    bits = "".join(c for c in safetensors_dtype.split("_")[0] if c.isdigit())
    return int(bits) // 8 if bits else 1
