"""LoRA-Flow inside vLLM: a `vllm.general_plugins` plugin (optional extra `loraflow[vllm]`).

- `plugin.register` (the entry point): checks the vLLM version, registers the LoRA-Flow model
  architectures and installs the per-step routing hook;
- `prepare.prepare_model_dir`: writes a vLLM-loadable model directory (base weights linked, config.json
  naming our architecture and the adapters and gates to load);
- `requests.VllmFusions`: per-request fusion for `vllm.LLM` (`extra_args` plus the `cache_salt` that keeps
  prefix caching correct);
- `slicing`, `routing`: pure tensor/Python helpers (tensor-parallel layouts, fusion -> routing rows);
- `model`, `runner`: the parts that import vLLM.

Importing this package imports neither vLLM nor torch.
"""
