"""Run by test_vllm_tp.py in a process of its own: greedy tokens and log-probs of a prepared LoRA-Flow model
directory under `tensor_parallel_size` N, for each fusion alone and for a mixed batch, as JSON in OUT.

    python tp_worker.py MODEL_DIR N OUT

Its own process because tensor parallelism starts worker processes (spawned: they re-import this module,
hence the `__main__` guard), which the in-process engine of the other tests does not allow.
"""

from __future__ import annotations

import json
import sys

PROMPTS = [[5, 17, 42, 99, 7, 123, 64, 3, 250, 11], [8, 9, 10, 11, 12, 13, 14], [200, 3, 77, 31, 9]]
FUSIONS = ["gate", "gate:other", "off", "single:zh", "single:math", "static:0.7,-0.3"]


def main(model_dir: str, tp: int) -> dict:
    import vllm

    from loraflow.vllm.requests import VllmFusions

    fusions = VllmFusions.from_model_dir(model_dir)
    llm = vllm.LLM(model=model_dir, dtype="float32", max_model_len=256, max_num_seqs=16, tensor_parallel_size=tp,
                   enforce_eager=True, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)

    def run(pairs):
        outs = llm.generate([p for p, _ in pairs], [s for _, s in pairs], use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]) for o in outs]

    found = {f: run([fusions.request(p, f, params) for p in PROMPTS]) for f in FUSIONS}
    mixed = [(p, f) for p in PROMPTS for f in FUSIONS]
    found["mixed"] = run([fusions.request(p, f, params) for p, f in mixed])
    return found


if __name__ == "__main__":
    from pathlib import Path

    Path(sys.argv[3]).write_text(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
