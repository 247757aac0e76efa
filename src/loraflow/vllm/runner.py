"""The per-step routing hook: after vLLM's model runner prepares a step's inputs, each scheduled request's
fusion (its SamplingParams.extra_args["fusion"]) is written into the model's routing buffers.

This wraps `GPUModelRunner._prepare_inputs` (which vLLM's CPU runner inherits), a private API: the
plugin checks the vLLM version before installing it. Models without `loraflow_route` are untouched.
"""

from __future__ import annotations

import functools

from loraflow.vllm.routing import fusion_of

_MARK = "_loraflow_routing_hook"


def install_routing_hook() -> None:
    """Wrap the model runner's input preparation once per process (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        route = getattr(self.get_model(), "loraflow_route", None)
        if route is not None:
            num_reqs = self.input_batch.num_reqs
            req_ids = self.input_batch.req_ids[:num_reqs]
            fusions = [fusion_of(self.requests[r].sampling_params.extra_args) for r in req_ids]
            route(fusions, [int(n) for n in num_scheduled_tokens[:num_reqs]])
        return result

    setattr(_prepare_inputs, _MARK, True)
    GPUModelRunner._prepare_inputs = _prepare_inputs
