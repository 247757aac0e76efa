"""Reading PEFT LoRA adapters from disk, without PEFT's model injection and without pickles.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` (or the older
`adapter_model.bin`). We read the per-module A and B matrices and each module's scale
(lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, honouring rank_pattern / alpha_pattern),
then hand them to the fused layers, which stack them. Nothing else keeps a copy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraflow.common.checks import check_float, check_int
from loraflow.common.errors import LoraFlowError
from loraflow.common.io import read_bytes
from loraflow.core.checkpoints import check_finite, load_safetensors_file, load_torch_file, resolve_checkpoint_dir

CONFIG_NAME = "adapter_config.json"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA adapters (use_dora=True)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
}
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA adapters (use_dora=True)",
    "lora_bias": "LoRA bias terms (lora_bias=True)",
}


@dataclass
class LoraModuleWeights:
    """The low-rank update of one linear module: delta(x) = scale * B @ A @ x."""

    lora_A: torch.Tensor  # (r, in_features)
    lora_B: torch.Tensor  # (out_features, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: its name, where it came from, and its per-module weights."""

    name: str
    path: str
    config: dict
    modules: dict[str, LoraModuleWeights] = field(default_factory=dict)

    @property
    def dropout(self) -> float:
        return float(self.config.get("lora_dropout", 0.0) or 0.0)

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def summary(self) -> dict:
        """JSON-serialisable description, recorded in gate checkpoints."""
        ranks = sorted({m.rank for m in self.modules.values()})
        targets = sorted({p.rsplit(".", 1)[-1] for p in self.modules})
        return {"name": self.name, "ranks": ranks, "target_modules": targets, "num_modules": len(self.modules)}


def resolve_adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter directory `path` names: itself, the directory of a file inside it, or the
    selected checkpoint (`best`) of a train-lora output directory."""
    return resolve_checkpoint_dir(path, CONFIG_NAME, "PEFT adapter directory")


def _read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    try:
        cfg = json.loads(read_bytes(cfg_file, what="adapter config").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise LoraFlowError(f"{cfg_file}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraFlowError(f"{cfg_file}: expected a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraFlowError(f"{cfg_file}: peft_type is {peft_type}, only LORA adapters can be fused")
    for key, what in _UNSUPPORTED_CONFIG.items():
        if cfg.get(key):
            raise LoraFlowError(f"{cfg_file}: {what} are not supported")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise LoraFlowError(f"{cfg_file}: missing 'r' or 'lora_alpha'")
    try:
        check_int("r", cfg["r"], low=1)
        check_float("lora_alpha", cfg["lora_alpha"], low=0.0, low_open=True)
        if cfg.get("lora_dropout") is not None:
            check_float("lora_dropout", cfg["lora_dropout"], low=0.0, high=1.0, high_open=True)
        for name, value in (cfg.get("rank_pattern") or {}).items():
            check_int(f"rank_pattern[{name!r}]", value, low=1)
        for name, value in (cfg.get("alpha_pattern") or {}).items():
            check_float(f"alpha_pattern[{name!r}]", value, low=0.0, low_open=True)
    except (ValueError, AttributeError) as e:
        raise LoraFlowError(f"{cfg_file}: {e}") from None
    return cfg


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        return load_safetensors_file(st, what="adapter weights file")
    if binf.is_file():
        sd = load_torch_file(binf, what="adapter weights file")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LoraFlowError(f"{binf}: expected a dict of tensors")
        return sd
    raise LoraFlowError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _module_scale(cfg: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = cfg["lora_alpha"]
    patterns = cfg.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module)
        alpha = patterns.get(key, alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def load_adapter(name: str, path: str | Path) -> LoraAdapter:
    """Read one PEFT LoRA adapter directory into per-module weights (fp32 or as stored).

    Raises:
        LoraFlowError: missing or corrupt files, unsupported adapter kinds, inconsistent shapes.
    """
    path = resolve_adapter_dir(path)
    cfg = _read_config(path)
    state = _read_state_dict(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    whole_modules = []
    for key, tensor in state.items():
        for bad, what in _UNSUPPORTED_KEYS.items():
            if bad in key:
                raise LoraFlowError(f"{path}: {what} are not supported (key {key})")
        m = _KEY.match(key)
        if m is None:
            if ".lora_" in key:
                raise LoraFlowError(f"{path}: unsupported adapter weight {key}")
            whole_modules.append(key)
            continue
        halves.setdefault(m["module"], {})[m["which"]] = tensor
    if whole_modules or cfg.get("modules_to_save"):
        named = cfg.get("modules_to_save") or sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0]
                                                     for k in whole_modules})
        raise LoraFlowError(
            f"{path}: the adapter also replaces whole modules (modules_to_save: {', '.join(map(str, named))}); "
            "a per-token mix of full module copies is not defined by LoRA-Flow, so such adapters are not "
            "supported (retrain without modules_to_save)"
        )
    check_finite(state, path / ("adapter_model.safetensors" if (path / "adapter_model.safetensors").is_file()
                                else "adapter_model.bin"))
    if not halves:
        raise LoraFlowError(f"{path}: the adapter holds no LoRA weights")
    modules: dict[str, LoraModuleWeights] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise LoraFlowError(f"{path}: module {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraFlowError(
                f"{path}: module {module} has inconsistent shapes A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        modules[module] = LoraModuleWeights(a, b, _module_scale(cfg, module, a.shape[0]))
    return LoraAdapter(name=name, path=str(path), config=cfg, modules=modules)
