"""The fixed probe batch of export verification, and its run in a fresh process.

A reload in the exporting process could share state with the model it just saved (cached
modules, quant states, kernels already chosen), so the reload is checked by a new interpreter:
``python -m toolkit.exporting.probe MODEL_DIR IDS_FILE LOGITS_FILE`` loads the directory exactly as a user
would and writes the probe logits. Tensors cross the process boundary as safetensors, never pickle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from toolkit.inference import load

PROBE_ROWS, PROBE_LEN, PROBE_SEED = 2, 32, 1234


def probe_ids(vocab_size: int, max_positions: int | None = None) -> torch.Tensor:
    """The probe batch: (2, 32) token ids drawn with a fixed seed, the same on every machine."""
    length = min(PROBE_LEN, max_positions or PROBE_LEN)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (PROBE_ROWS, length), generator=generator)


def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the probe batch, on CPU; shape (rows, length, vocab)."""
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius), the one divergence measure of export."""
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def reload_logits(model_dir: Path, ids: torch.Tensor, *, trust_remote_code: bool = False, timeout_s: float = 3600) -> torch.Tensor:
    """Load ``model_dir`` in a new Python process and return its probe logits.

    Raises:
        RuntimeError: the child process failed; its output is included.
    """
    with tempfile.TemporaryDirectory(prefix="dstk-probe-") as exchange:
        ids_file, logits_file = Path(exchange, "ids.safetensors"), Path(exchange, "logits.safetensors")
        save_file({"ids": ids.contiguous()}, ids_file)
        command = [sys.executable, "-m", "toolkit.exporting.probe", str(model_dir), str(ids_file), str(logits_file)]
        if trust_remote_code:
            command.append("--trust-remote-code")
        # The child must import this same toolkit, installed or not.
        package_root = str(Path(__file__).absolute().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"reloading {model_dir} in a fresh process failed:\n{done.stdout}{done.stderr}")
        return load_file(logits_file)["logits"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the probe logits of a model directory (export verification).")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("ids_file", type=Path)
    parser.add_argument("logits_file", type=Path)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    loaded = load(args.model_dir, trust_remote_code=args.trust_remote_code)
    logits = probe_logits(loaded.model, load_file(args.ids_file)["ids"])
    save_file({"logits": logits.contiguous()}, args.logits_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
