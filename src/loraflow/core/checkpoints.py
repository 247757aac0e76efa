"""Gate checkpoints: loraflow's own directory format and the authors' official `.pt` files.

Our format is a directory with
- `gate_config.json`: a GateConfig (adapter names and order, base model, hidden size, layer
  count, temperature, granularity), so a gate is never silently applied to the wrong model;
- `gate.safetensors`: the GateBank state dict (fp32).

Official files are plain dicts saved with torch.save: `encoder.layers.{i}.lora_fusion_gate.weight`
(k, hidden) and optionally `encoder.layers.{i}.weight_bias` (1, k). They are read with
`torch.load(weights_only=True)`, which refuses pickles that would run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import atomic_dir
from loraflow.core.gate import GateConfig

CONFIG_NAME = "gate_config.json"
WEIGHTS_NAME = "gate.safetensors"
_OFFICIAL_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(lora_fusion_gate\.weight|weight_bias)$")


def is_official_gate_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin")


def save_gate_checkpoint(out_dir: str | os.PathLike, config: GateConfig, state_dict: dict[str, torch.Tensor],
                         extra: dict | None = None) -> Path:
    """Write config + weights into `out_dir` atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    payload = config.to_dict()
    if extra:
        payload["extra"] = extra

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "loraflow-gate"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_dir(out_dir, write)


def load_gate_checkpoint(path: str | os.PathLike) -> tuple[GateConfig, dict[str, torch.Tensor]]:
    """Read one of our gate directories. Raises LoraFlowError naming the file on any problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise LoraFlowError(f"{path}: gate directory not found")
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise LoraFlowError(f"{f}: missing (not a loraflow gate directory)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        config = GateConfig.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraFlowError(f"{cfg_file}: corrupt JSON ({e})") from None
    except (TypeError, ValueError) as e:
        raise LoraFlowError(f"{cfg_file}: invalid gate config ({e})") from None
    try:
        state = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFlowError(f"{weights_file}: corrupt safetensors file ({e})") from None
    return config, state


def load_official_gate(path: str | os.PathLike) -> tuple[int, int, int, dict[str, torch.Tensor]]:
    """Read an official LoRA-Flow `.pt` gate safely.

    Returns:
        (num_layers, k, hidden_size, state_dict in our layer-granularity key layout); a missing
        `weight_bias` (the older variant) becomes a zero bias.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFlowError(f"{path}: gate file not found")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise LoraFlowError(
            f"{path}: refused: the pickle holds more than tensors and loading it would run code ({first})"
        ) from None
    except Exception as e:  # torch raises many types on garbage input; all mean "not a gate file"
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraFlowError(f"{path}: corrupt or unreadable gate file ({detail})") from None
    if not isinstance(raw, dict):
        raise LoraFlowError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    weights: dict[int, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    unexpected = []
    for key, value in raw.items():
        m = _OFFICIAL_KEY.match(str(key))
        if m is None or not isinstance(value, torch.Tensor):
            unexpected.append(str(key))
            continue
        (weights if m[2].endswith("weight") and "gate" in m[2] else biases)[int(m[1])] = value
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if not weights:
        raise LoraFlowError(f"{path}: no 'layers.N.lora_fusion_gate.weight' keys: not a LoRA-Flow gate file")
    n = max(weights) + 1
    missing = [i for i in range(n) if i not in weights]
    if missing:
        problems.append(f"missing gate weights for layers {missing}")
    shapes = {tuple(w.shape) for w in weights.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        problems.append(f"inconsistent gate weight shapes {sorted(shapes)}")
    if problems:
        raise LoraFlowError(f"{path}: " + "; ".join(problems))
    k, hidden = next(iter(shapes))
    bad_bias = [i for i, b in biases.items() if b.numel() != k or i >= n]
    if bad_bias:
        raise LoraFlowError(f"{path}: weight_bias of layers {bad_bias} does not have {k} values or has no gate")
    state = {}
    for i in range(n):
        state[f"layers.{i}.weight"] = weights[i].float()
        state[f"layers.{i}.bias"] = biases[i].float().view(1, k) if i in biases else torch.zeros(1, k)
    return n, k, hidden, state


def convert_official_gate(official: str | os.PathLike, adapter_names: list[str], out_dir: str | os.PathLike, *,
                          temperature: float = 1.0, base_model: str | None = None) -> Path:
    """Convert an official `.pt` gate into a loraflow gate directory (config records names and shapes)."""
    n, k, hidden, state = load_official_gate(official)
    if len(adapter_names) != k:
        raise LoraFlowError(
            f"{official}: the gate mixes {k} adapters but {len(adapter_names)} names were given ({','.join(adapter_names)})"
        )
    try:
        config = GateConfig(adapter_names=list(adapter_names), hidden_size=hidden, num_layers=n,
                            temperature=temperature, base_model=base_model)
    except ValueError as e:
        raise LoraFlowError(f"{official}: {e}") from None
    return save_gate_checkpoint(out_dir, config, state, extra={"converted_from": str(official)})
