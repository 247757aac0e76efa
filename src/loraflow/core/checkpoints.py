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
import warnings
from pathlib import Path
from typing import Any

import torch

from loraflow.common.checks import check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.io import atomic_dir, check_output_dir, check_readable_file, read_bytes
from loraflow.core.gate import GateConfig

CONFIG_NAME = "gate_config.json"
WEIGHTS_NAME = "gate.safetensors"
GATE_FILES = (CONFIG_NAME, WEIGHTS_NAME)
TRAINING_OUTPUTS = ("best", "last")  # subdirectories of a train-gate / train-lora output directory, preferred first
_OFFICIAL_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(lora_fusion_gate\.weight|weight_bias)$")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: (?:GLOBAL )?([\w.]+)")


# ----------------------------------------------------------------------------- safe reading
def load_torch_file(path: str | os.PathLike, what: str = "weights file") -> Any:
    """`torch.load` with `weights_only=True`, every failure turned into a one-line LoraFlowError.

    Pickles that name Python objects beyond tensors are refused (loading them would run code);
    anything else that does not load is reported as corrupt or not a PyTorch file. torch's advice
    to disable the safety check is never passed on.
    """
    path = Path(path)
    check_readable_file(path, what=what)  # not found / directory / permission denied, in plain words
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        names = [found[1]] if found else _code_references(path)
        if names:
            raise LoraFlowError(
                f"{path}: refused: the file references Python objects beyond tensors ({', '.join(names[:3])}) "
                "and loading it would run code"
            ) from None
        raise LoraFlowError(f"{path}: corrupt or not a PyTorch {what} (unsupported pickle content)") from None
    except PermissionError:
        raise LoraFlowError(f"{path}: cannot read the {what} (permission denied)") from None
    except Exception:  # torch raises many types on garbage or truncated input; all mean "unreadable"
        raise LoraFlowError(f"{path}: corrupt, truncated or not a PyTorch {what}") from None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set",
                         "builtins.frozenset", "builtins.bytearray", "numpy.")


def _code_references(path: Path) -> list[str]:
    """Importable names a pickle would call (read without executing it), torch's own left out; [] when unsure."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(pkl) if pkl else b""
        else:
            data = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle at all: the caller reports a corrupt file
        return []
    return [n for n in dict.fromkeys(names) if not n.startswith(_SAFE_GLOBAL_PREFIXES)]


def load_safetensors_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A safetensors file as CPU tensors; errors name the file (corrupt, truncated, unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_readable_file(path, what=what)
    try:
        return load_file(str(path), device="cpu")
    except PermissionError:
        raise LoraFlowError(f"{path}: cannot read the {what} (permission denied)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraFlowError(f"{path}: corrupt or truncated safetensors {what} ({detail})") from None


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinite values, naming the first offending tensors."""
    bad = [k for k, v in state.items()
           if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise LoraFlowError(f"{source}: non-finite (NaN or infinite) values in {', '.join(bad[:3])}{more}")


# ----------------------------------------------------------------------------- where a gate is
def _suggest(path: Path, marker: str) -> str:
    """'; use DIR/best or DIR/x' for the subdirectories of `path` that hold `marker`."""
    try:
        subdirs = sorted(p for p in path.iterdir() if (p / marker).is_file())
    except OSError:
        return ""
    subdirs.sort(key=lambda p: (p.name not in TRAINING_OUTPUTS, TRAINING_OUTPUTS.index(p.name)
                                if p.name in TRAINING_OUTPUTS else 0, p.name))
    return f"; these subdirectories would work: {', '.join(str(p) for p in subdirs[:5])}" if subdirs else ""


def resolve_checkpoint_dir(path: str | os.PathLike, marker: str, what: str) -> Path:
    """The directory holding `marker` that `path` names: itself, the directory of a file inside it, or the
    selected checkpoint (`best`, else `last`) of a training output directory.

    Raises:
        LoraFlowError: nothing there, or a directory without `marker` (listing subdirectories that have it).
    """
    path = Path(path)
    if path.is_file() and path.parent.joinpath(marker).is_file():
        return path.parent
    if not path.exists():
        raise LoraFlowError(f"{path}: {what} not found")
    if not path.is_dir():
        raise LoraFlowError(f"{path}: not a {what} (expected a directory with {marker})")
    if (path / marker).is_file():
        return path
    for sub in TRAINING_OUTPUTS:
        if (path / sub / marker).is_file():
            return path / sub
    raise LoraFlowError(f"{path / marker}: missing (not a {what}){_suggest(path, marker)}")


def is_official_gate_file(path: str | os.PathLike) -> bool:
    """A regular file that is not part of one of our gate directories: read as an official torch.save'd gate."""
    path = Path(path)
    return path.is_file() and path.suffix not in (".safetensors", ".json")


def resolve_gate(path: str | os.PathLike) -> Path:
    """The gate directory (or official gate file) `path` names; a training output directory gives its `best`."""
    path = Path(path)
    if is_official_gate_file(path):
        return path
    return resolve_checkpoint_dir(path, CONFIG_NAME, "loraflow gate directory")


# ----------------------------------------------------------------------------- our format
def save_gate_checkpoint(out_dir: str | os.PathLike, config: GateConfig, state_dict: dict[str, torch.Tensor],
                         extra: dict | None = None, *, force: bool = False) -> Path:
    """Write config + weights into `out_dir` atomically (a temp dir swapped into place).

    An existing `out_dir` is replaced only if loraflow wrote it (or `force`); a file is never replaced.
    """
    from safetensors.torch import save_file

    check_output_dir(out_dir, force=force, known_names=GATE_FILES, what="gate directory")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    check_finite(tensors, f"gate for {out_dir}")
    payload = config.to_dict()
    if extra:
        payload["extra"] = extra

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "loraflow-gate"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_dir(out_dir, write, force=force)


def load_gate_checkpoint(path: str | os.PathLike) -> tuple[GateConfig, dict[str, torch.Tensor]]:
    """Read one of our gate directories (or a training output directory: its `best`).

    Raises LoraFlowError naming the file on any problem, non-finite weights included.
    """
    path = resolve_checkpoint_dir(path, CONFIG_NAME, "loraflow gate directory")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise LoraFlowError(f"{weights_file}: missing (not a loraflow gate directory)")
    try:
        raw = json.loads(read_bytes(cfg_file, what="gate config").decode("utf-8"),
                         parse_constant=_refuse_constant)
        if not isinstance(raw, dict):
            raise TypeError("expected a JSON object")
        if "temperature" in raw:
            check_positive("temperature", raw["temperature"])
        config = GateConfig.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraFlowError(f"{cfg_file}: corrupt JSON ({e})") from None
    except (TypeError, ValueError) as e:
        raise LoraFlowError(f"{cfg_file}: invalid gate config ({e})") from None
    state = load_safetensors_file(weights_file, what="gate weights file")
    check_finite(state, weights_file)
    return config, state


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a valid number here")


# ----------------------------------------------------------------------------- official format
def load_official_gate(path: str | os.PathLike) -> tuple[int, int, int, dict[str, torch.Tensor]]:
    """Read an official LoRA-Flow `.pt` gate safely.

    Returns:
        (num_layers, k, hidden_size, state_dict in our layer-granularity key layout); a missing
        `weight_bias` (the older variant) becomes a zero bias.
    """
    path = Path(path)
    raw = load_torch_file(path, what="gate file")
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
    if n != len(weights):
        missing = [i for i in range(min(n, len(weights) + 6)) if i not in weights][:5]
        problems.append(f"missing gate weights for {n - len(weights)} of layers 0..{n - 1} (e.g. {missing})")
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
    check_finite({f"layers.{i}.weight": w for i, w in weights.items()}
                 | {f"layers.{i}.weight_bias": b for i, b in biases.items()}, path)
    for i in range(n):
        state[f"layers.{i}.weight"] = weights[i].float()
        state[f"layers.{i}.bias"] = biases[i].float().view(1, k) if i in biases else torch.zeros(1, k)
    return n, k, hidden, state


def convert_official_gate(official: str | os.PathLike, adapter_names: list[str], out_dir: str | os.PathLike, *,
                          temperature: float = 1.0, base_model: str | None = None, force: bool = False) -> Path:
    """Convert an official `.pt` gate into a loraflow gate directory (config records names and shapes).

    `out_dir` is checked first: it may not be the input, a file, or a directory loraflow did not write
    (unless `force`).
    """
    try:
        temperature = check_positive("temperature", temperature)
    except ValueError as e:
        raise LoraFlowError(f"--{e}") from None
    check_output_dir(out_dir, force=force, known_names=GATE_FILES, inputs=[official], what="gate directory")
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
    return save_gate_checkpoint(out_dir, config, state, extra={"converted_from": str(official)}, force=force)
