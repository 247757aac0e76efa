"""A vLLM-loadable LoRA-Flow model directory: the base's files linked, config.json naming our architecture.

The directory holds symbolic links to the base model's files (weights, tokenizer, generation config:
nothing copied) and a config.json that is the base's with `architectures` set to the LoRA-Flow class and
a `loraflow` block naming the adapters and gates (absolute paths, read when vLLM builds the model) and
the default fusion. `quantization_config` is dropped (a model saved from a dequantised GGUF keeps it and
vLLM would refuse it). Written atomically; an existing directory is replaced only if loraflow wrote it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import atomic_dir, check_output_dir, read_bytes
from loraflow.vllm.architectures import plugin_architecture
from loraflow.vllm.assets import FORMAT_VERSION, SETTINGS_KEY

_OWN = ("config.json",)


def _pairs(items, what: str) -> list[tuple[str, str]]:
    pairs = list(items.items()) if isinstance(items, Mapping) else [tuple(p) for p in items or []]
    names = [str(n) for n, _ in pairs]
    if len(set(names)) != len(names):
        raise LoraFlowError(f"duplicate {what} names: {', '.join(names)}")
    return [(str(n), str(p)) for n, p in pairs]


def _read_config(cfg_file: Path) -> dict:
    """A model's config.json as a dict, or a one-line LoraFlowError naming the file."""
    try:
        cfg = json.loads(read_bytes(cfg_file, what="model config").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraFlowError(f"{cfg_file}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraFlowError(f"{cfg_file}: expected a JSON object")
    return cfg


def _base_config(base: Path) -> dict:
    cfg_file = base / "config.json"
    if not base.is_dir() or not cfg_file.is_file():
        raise LoraFlowError(f"{base}: not a transformers model directory (no config.json); the vLLM engine needs "
                            "the base saved with save_pretrained (safetensors), e.g. a dequantised GGUF saved once")
    cfg = _read_config(cfg_file)
    cfg["architectures"] = [plugin_architecture(cfg, str(cfg_file))]  # the plugin's, in the written config
    if not any(base.glob("*.safetensors")):
        raise LoraFlowError(f"{base}: no *.safetensors weights (vLLM's loader reads safetensors; save the base with "
                            "save_pretrained)")
    return cfg


def prepare_model_dir(out_dir: str | os.PathLike, base: str | os.PathLike,
                      adapters: Mapping[str, str | os.PathLike] | Sequence[tuple[str, str | os.PathLike]],
                      gates: Mapping[str, str | os.PathLike] | Sequence[tuple[str, str | os.PathLike]] = (),
                      *, default_fusion: str | None = None, temperatures: Mapping[str, float] | None = None,
                      force: bool = False) -> Path:
    """Write a model directory vLLM loads as a LoRA-Flow model (with the plugin installed).

    Args:
        out_dir: the directory to write (replaced only if loraflow wrote it, or `force`).
        base: a transformers model directory (config.json + safetensors) of a supported architecture.
        adapters: {name: PEFT adapter dir} in gate-output order.
        gates: {name: loraflow gate dir or official .pt file}; the first is what fusion `gate` means.
        default_fusion: the fusion of requests that name none (default: `gate` when there are gates, else `off`).
        temperatures: per gate name, a softmax temperature overriding the gate's own.

    Raises:
        LoraFlowError: an unusable base, adapter or gate (checked before anything is written), or an
            output directory that is not ours.
    """
    from loraflow.core.adapters import load_adapter
    from loraflow.vllm.assets import check_adapter_targets, load_gate_stack
    from loraflow.vllm.routing import FusionTable

    base = Path(base).resolve()
    adapter_pairs, gate_pairs = _pairs(adapters, "adapter"), _pairs(gates, "gate")
    if not adapter_pairs:
        raise LoraFlowError("no adapters given: LoRA-Flow fuses k >= 1 LoRA adapters")
    temperatures = dict(temperatures or {})
    unknown = sorted(set(temperatures) - {n for n, _ in gate_pairs})
    if unknown:
        raise LoraFlowError(f"temperature given for unknown gates: {', '.join(unknown)}")
    out_dir = check_output_dir(out_dir, force=force, known_names=_OWN,
                               inputs=[base] + [p for _, p in adapter_pairs + gate_pairs])
    cfg = _base_config(base)
    layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    loaded = [load_adapter(n, p) for n, p in adapter_pairs]
    for adapter in loaded:
        check_adapter_targets(adapter, layers)
    names = [a.name for a in loaded]
    gate_entries = []
    for name, path in gate_pairs:
        load_gate_stack(path, names, layers, hidden, temperatures.get(name))  # checks it fits
        gate_entries.append({"name": name, "path": str(Path(path).resolve()), "temperature": temperatures.get(name)})
    table = FusionTable(names, [n for n, _ in gate_pairs],
                        default_fusion or ("gate" if gate_pairs else "off"))
    cfg.pop("quantization_config", None)
    cfg[SETTINGS_KEY] = {
        "format_version": FORMAT_VERSION,
        "base": str(base),
        "adapters": [{"name": a.name, "path": str(Path(a.path).resolve())} for a in loaded],
        "gates": gate_entries,
        "default_fusion": table.default_fusion,
    }

    def write(tmp: Path) -> None:
        for item in sorted(base.iterdir()):
            if item.name != "config.json" and item.is_file() and not item.name.startswith("."):
                (tmp / item.name).symlink_to(item.resolve())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_dir(out_dir, write, force=force)


VLLM_DTYPES = ("float32", "bfloat16", "float16")


def vllm_dtype(requested: str | None, model_dir: str | os.PathLike) -> str:
    """The dtype to pass to vLLM so that it loads what the default engine loads for the same `--dtype`.

    None means the checkpoint's (its config.json's `dtype`/`torch_dtype`, float32 when it names none), as
    transformers loads it; "auto" is bfloat16 on a CUDA GPU that supports it, else float32. vLLM's own "auto"
    differs (bfloat16 on CPU even for a float32 checkpoint), so it is never passed on.
    """
    if requested not in (None, "auto"):
        return requested
    if requested == "auto":
        import torch

        from loraflow.core.devices import resolve_dtype

        return str(resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")).removeprefix("torch.")
    cfg = _read_config(Path(model_dir) / "config.json")
    named = cfg.get("dtype", cfg.get("torch_dtype"))
    return named if named in VLLM_DTYPES else "float32"
