"""The per-step routing hook: after vLLM's model runner prepares a step's inputs, each scheduled request's
fusion (its SamplingParams.extra_args["fusion"]) is written into the model's routing buffers.

This wraps private methods of vLLM's V1 model runner (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`,
which its V1 CPU runner subclasses); the plugin checks the vLLM version before installing them:
`_prepare_inputs` routes the step; `_model_forward`, called once per real step (dummy, profile and
CUDA-graph capture runs call the model directly), checks that it was routed, at the runner level because
full CUDA graphs replay without the model's Python forward; `load_model` lets a LoRA-Flow model check,
when it is built, that such a runner loads it. Unfilled buffers would run every request as `off`, so any
other runner is refused there in one line: Model Runner V2 (vLLM's GPU default where Triton is usable; it
has no `_prepare_inputs`) with its remedy, VLLM_USE_V2_MODEL_RUNNER=0. Models without `loraflow_route`
are untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from loraflow.common.errors import LoraFlowError
from loraflow.vllm.routing import fusion_of
from loraflow.vllm.versions import SUPPORTED_RANGE

_MARK = "_loraflow_routing_hook"
_ROUTED = ("_prepare_inputs", "_model_forward")  # a runner routes our models only if it runs these wrappers
_OFF = "so every request would run as fusion 'off'"
_loading: list[type] = []  # the V1 runner classes inside load_model now (innermost last)


def install_routing_hook() -> None:
    """Wrap the V1 model runner's input preparation, forward and model loading once per process (idempotent)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(GPUModelRunner, "_prepare_inputs", _routing_prepare_inputs)
    _wrap(GPUModelRunner, "_model_forward", _checked_model_forward)
    for cls in (GPUModelRunner, CPUModelRunner):  # the CPU runner loads with its own load_model
        _wrap(cls, "load_model", _marking_load_model)


def _wrap(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__[name]
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _routing_prepare_inputs(original: Callable) -> Callable:
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        route = getattr(self.get_model(), "loraflow_route", None)
        if route is not None:
            num_reqs = self.input_batch.num_reqs
            req_ids = self.input_batch.req_ids[:num_reqs]
            fusions = [fusion_of(self.requests[r].sampling_params.extra_args) for r in req_ids]
            route(fusions, [int(n) for n in num_scheduled_tokens[:num_reqs]])
        return result

    return _prepare_inputs


def _checked_model_forward(original: Callable) -> Callable:
    def _model_forward(self, *args, **kwargs):
        routing = getattr(self.get_model(), "loraflow_routing", None)
        if routing is not None:
            routing.check_step()
        return original(self, *args, **kwargs)

    return _model_forward


def _marking_load_model(original: Callable) -> Callable:
    def load_model(self, *args, **kwargs):
        _loading.append(type(self))
        try:
            return original(self, *args, **kwargs)
        finally:
            _loading.pop()

    return load_model


def loading_runner() -> type | None:
    """The V1 model runner class whose `load_model` is running now (None: no such runner is loading)."""
    return _loading[-1] if _loading else None


def check_runner(runner: type | None, vllm_config) -> None:
    """Refuse, in one line, to build a LoRA-Flow model whose steps `runner` would not route.

    Args:
        runner: the model runner class loading the model (`loading_runner()`); accepted if it is vLLM's V1
            runner (or a subclass) running the plugin's wrappers.
        vllm_config: the engine's VllmConfig; where it chose Model Runner V2 the message says so and how
            to turn it off.

    Raises:
        LoraFlowError: any other runner, or none.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if runner is not None and issubclass(runner, GPUModelRunner):
        replaced = [name for name in _ROUTED if not getattr(getattr(runner, name), _MARK, False)]
        if not replaced:
            return
        raise LoraFlowError(f"vLLM model runner {runner.__module__}.{runner.__qualname__} replaces "
                            f"{', '.join(replaced)}, where the LoRA-Flow plugin routes each step ({_OFF}); run the "
                            f"model with vLLM's own V1 GPUModelRunner or CPUModelRunner")
    if vllm_config.use_v2_model_runner:
        raise LoraFlowError(f"vLLM is using its Model Runner V2 (VllmConfig.use_v2_model_runner), which the LoRA-Flow "
                            f"plugin does not support yet: it cannot route its steps ({_OFF}); set "
                            f"VLLM_USE_V2_MODEL_RUNNER=0 to use vLLM's V1 model runner, which it routes")
    where = ("outside any model runner's load_model" if runner is None
             else f"by {runner.__module__}.{runner.__qualname__}")
    raise LoraFlowError(f"a LoRA-Flow model was built {where}, not by vLLM's V1 model runner (GPUModelRunner or "
                        f"CPUModelRunner, vllm{SUPPORTED_RANGE}), the only one whose steps the plugin routes ({_OFF}); "
                        f"run it with that runner (VLLM_USE_V2_MODEL_RUNNER=0)")
