"""Per-request fusion for `vllm.LLM`: the prompt with its prefix-cache salt and SamplingParams with the
fusion, built together so a request can never carry a fusion without the matching salt.

vLLM's prefix cache keys KV blocks by tokens, LoRA and `cache_salt`, not by `extra_args`: without a
salt per fusion a gate request would reuse KV computed with adapters off, and be wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loraflow.common.errors import LoraFlowError
from loraflow.common.io import read_bytes
from loraflow.vllm.assets import read_settings
from loraflow.vllm.routing import FUSION_KEY, FusionTable


class VllmFusions:
    """The fusions a prepared model directory offers; builds (prompt, SamplingParams) pairs for vLLM.

    Example:
        fusions = VllmFusions.from_model_dir(prepared)
        prompt, params = fusions.request("2+2=", "gate:zh-math", SamplingParams(max_tokens=32))
        llm.generate([prompt], [params])
    """

    def __init__(self, table: FusionTable) -> None:
        self.table = table

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> VllmFusions:
        """Read the adapters, gates and default fusion from a prepared directory's config.json."""
        cfg_file = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(read_bytes(cfg_file, what="model config").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraFlowError(f"{cfg_file}: corrupt JSON ({e})") from None
        settings = read_settings(cfg if isinstance(cfg, dict) else {})
        return cls(FusionTable([a["name"] for a in settings["adapters"]],
                               [g["name"] for g in settings.get("gates") or []], settings.get("default_fusion") or "off"))

    def prompt(self, prompt: str | dict, fusion: str | None) -> dict:
        """A vLLM prompt dict (text or token ids) carrying the fusion's cache salt."""
        salt = self.table.cache_salt(fusion)
        if isinstance(prompt, str):
            return {"prompt": prompt, "cache_salt": salt}
        if isinstance(prompt, dict):
            return {**prompt, "cache_salt": salt}
        return {"prompt_token_ids": list(prompt), "cache_salt": salt}

    def sampling_params(self, fusion: str | None, params: Any = None) -> Any:
        """A copy of `params` (default SamplingParams()) with extra_args["fusion"] set to the canonical spec."""
        from vllm import SamplingParams

        params = SamplingParams() if params is None else params.clone()
        params.extra_args = {**(params.extra_args or {}), FUSION_KEY: self.table.canonical(fusion)}
        return params

    def request(self, prompt: str | dict | list[int], fusion: str | None, params: Any = None) -> tuple[dict, Any]:
        """(prompt dict with cache salt, SamplingParams with the fusion) for one request."""
        return self.prompt(prompt, fusion), self.sampling_params(fusion, params)
