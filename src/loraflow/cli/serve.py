"""`loraflow serve`: the OpenAI-compatible server (the work is in loraflow.serve)."""

from __future__ import annotations

import argparse

from loraflow.cli.args import add_options, build
from loraflow.serve.config import ServeConfig, ServeOptions


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API where every request picks its own fusion",
        description=(
            "Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI-compatible, streaming included),\n"
            "plus /health and Prometheus /metrics. The `model` of a request selects a served name:\n"
            "  each --gate NAME      LoRA-Flow with that gate\n"
            "  each --adapter NAME   that adapter alone\n"
            "  --served-model-name   the base model, adapters off (default: the base directory's name)\n"
            "  each --fusion NAME    a fixed fusion (avg, static:w1,w2,...)\n"
            "A request may instead carry the extension field `fusion`: \"off\", \"avg\", \"static:w1,w2\",\n"
            "{\"weights\": {\"zh\": 0.7, \"math\": 0.5}}, {\"gate\": NAME} or {\"adapter\": NAME}.\n"
            "Requests with different fusions decode in one batch; new requests join between decode steps."
        ),
        epilog=(
            "example:\n"
            "  loraflow serve --base llama-2-7b --adapter zh=lora-zh --adapter math=lora-math \\\n"
            "      --gate zh-math=zh_math.pt --fusion mix=avg --port 8000\n"
            "  # then, with the openai client: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')\n"
            "  #   .chat.completions.create(model='zh-math', messages=[...])\n"
            "Ctrl-C stops the server (open streams end with an error event)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, ServeOptions)
    add_options(p, ServeConfig)
    vllm = p.add_argument_group("vLLM engine (--engine vllm)")
    vllm.add_argument("--engine", choices=("default", "vllm"), default="default",
                      help="default: loraflow's own engine; vllm: vLLM's OpenAI server with the loraflow plugin behind "
                           "a proxy keeping these served names and the `fusion` field (default: default)")
    vllm.add_argument("--vllm-python", metavar="PATH", default=None,
                      help="the Python that has vLLM and loraflow (default: $LORAFLOW_VLLM_PYTHON, else this one)")
    vllm.add_argument("--vllm-args", metavar="ARGS", default="",
                      help="more options for vLLM's server, e.g. \"--tensor-parallel-size 2 --gpu-memory-utilization 0.8\"")
    vllm.add_argument("--vllm-model-dir", metavar="DIR", default=None,
                      help="where to write the vLLM model directory (links to the base; default: a temporary one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loraflow.common.extras import require

    require("fastapi", "uvicorn", "prometheus_client", what="serving")

    opts, config = build(ServeOptions, args), build(ServeConfig, args)
    if args.engine == "vllm":
        if config.compile:
            from loraflow.common.errors import LoraFlowError

            raise LoraFlowError("--compile is for the default engine: vLLM compiles its model itself")
        from loraflow.serve.vllm_proxy import serve_with_vllm

        serve_with_vllm(opts, config, vllm_python=args.vllm_python, vllm_args=args.vllm_args,
                        model_dir=args.vllm_model_dir)
        return 0
    from loraflow.serve.server import Server

    server = Server.from_pretrained(opts.base, opts.adapters, gates=opts.gates, fusions=opts.fusions, config=config,
                                    device=opts.device, dtype=opts.dtype)
    server.run()
    return 0
