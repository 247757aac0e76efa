"""Never silently `off`: a step the routing hook did not route fails in one line instead of answering with
the base model, and a model runner the plugin cannot route (Model Runner V2, any other) is refused when the
LoRA-Flow model is built, in one line naming the remedy.

The engine runs in this process (vllm_support sets VLLM_ENABLE_V1_MULTIPROCESSING=0), so patching vLLM's
runner class here reaches the engine's runner. Model Runner V2 needs Triton on a GPU: it is checked through
vLLM's real VllmConfig and the model's construction path, which is where the refusal happens.
"""

from __future__ import annotations

import os

import pytest

from vllm_support import greedy, require_vllm
from vllm_support import helper, prepared, tiny_fusion  # noqa: F401 (fixtures)

require_vllm()  # skip (or fail under LORAFLOW_REQUIRE_VLLM=1) before building any fixture

from loraflow.common.errors import LoraFlowError  # noqa: E402


def _one_line_error(exc: BaseException) -> str:
    """The LoraFlowError message behind `exc` (vLLM may wrap the engine's exception): one line."""
    seen = exc
    while seen is not None and not isinstance(seen, LoraFlowError):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no LoraFlowError behind {type(exc).__name__}: {exc}"
    message = str(seen)
    assert "\n" not in message, message
    return message


@pytest.mark.slow
def test_a_step_the_hook_did_not_route_fails_in_one_line_instead_of_answering_off(prepared, helper, monkeypatch):
    vllm = require_vllm()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "the engine must run in this process"
    llm = vllm.LLM(model=str(prepared), dtype="float32", max_model_len=256, max_num_seqs=4,
                   max_num_batched_tokens=256, seed=0, enforce_eager=True)
    try:
        prompt = list(range(5, 17))
        routed = greedy(llm, helper, [prompt], ["gate:zh-math"])[0]  # the hook fires: the check passes
        assert routed != greedy(llm, helper, [prompt], ["off"])[0]
        # the simulation: the hook no longer fires (as under a runner without `_prepare_inputs`)
        monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", GPUModelRunner._prepare_inputs.__wrapped__)
        with pytest.raises(Exception) as e:  # noqa: PT011 (vLLM may wrap it; the LoraFlowError is checked below)
            greedy(llm, helper, [prompt[::-1]], ["gate:zh-math"])
        message = _one_line_error(e.value)
        assert "routing was never written" in message and "_prepare_inputs" in message
        assert "VLLM_USE_V2_MODEL_RUNNER=0" in message
    finally:
        del llm


@pytest.fixture
def v2_config(prepared, monkeypatch):
    """make(use_v2) -> vLLM's real VllmConfig for the prepared model; its `use_v2_model_runner` (a property
    reading VLLM_USE_V2_MODEL_RUNNER, as vLLM's GPU worker does to pick the runner) is `use_v2`."""
    import vllm.envs
    from vllm.engine.arg_utils import EngineArgs

    from loraflow.vllm.plugin import register

    register()  # what vLLM does in each of its processes (idempotent): the runner's hooks are installed
    vllm.envs.disable_envs_cache()  # an engine built earlier in this process froze the environment

    def make(use_v2: bool):
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # validating a V2 config needs Triton: built as V1
        config = EngineArgs(model=str(prepared), dtype="float32", max_model_len=256,
                            max_num_batched_tokens=256).create_engine_config()
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if use_v2 else "0")  # the property reads it each time
        assert config.use_v2_model_runner is use_v2
        return config

    return make


def test_model_runner_v2_is_refused_when_the_model_is_built_with_the_remedy(v2_config):
    from loraflow.vllm.model import LoraFlowLlamaForCausalLM, LoraFlowQwen2ForCausalLM
    from loraflow.vllm.runner import check_runner

    config = v2_config(True)
    for cls in (LoraFlowLlamaForCausalLM, LoraFlowQwen2ForCausalLM):  # under V2, no V1 runner loads the model
        with pytest.raises(LoraFlowError) as e:
            cls(vllm_config=config)
        message = _one_line_error(e.value)
        assert "Model Runner V2" in message and "set VLLM_USE_V2_MODEL_RUNNER=0" in message, message
        assert "fusion 'off'" in message
    with pytest.raises(LoraFlowError, match="Model Runner V2"):
        check_runner(None, config)


def test_v2_runner_class_has_no_prepare_inputs_and_is_refused(v2_config):
    """vLLM's own V2 runner class (imported only: building one needs Triton on a GPU) is not one the plugin
    routes: it has no `_prepare_inputs`, and the check refuses it naming V2."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2
    except ImportError as e:  # its kernels' modules need Triton at import
        pytest.skip(f"vLLM's Model Runner V2 module is not importable here ({e})")
    from loraflow.vllm.runner import check_runner

    assert not hasattr(ModelRunnerV2, "_prepare_inputs")
    with pytest.raises(LoraFlowError, match="Model Runner V2.*VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(ModelRunnerV2, v2_config(True))


def test_other_runners_and_builds_outside_a_v1_runner_are_refused(v2_config):
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from loraflow.vllm.model import LoraFlowLlamaForCausalLM
    from loraflow.vllm.runner import check_runner

    config = v2_config(False)
    check_runner(GPUModelRunner, config)  # vLLM's V1 runners, with the plugin's wrappers: accepted
    check_runner(CPUModelRunner, config)

    class Replaced(CPUModelRunner):
        def _model_forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    with pytest.raises(LoraFlowError) as e:
        check_runner(Replaced, config)
    assert "Replaced replaces _model_forward" in _one_line_error(e.value)
    with pytest.raises(LoraFlowError) as e:
        LoraFlowLlamaForCausalLM(vllm_config=config)
    message = _one_line_error(e.value)
    assert "built outside any model runner's load_model" in message and "V1 model runner" in message
    assert "Model Runner V2" not in message
