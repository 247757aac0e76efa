"""Experiment: cheaper formulations of FusedLoraLinear's adapter path, timed inside a real decode step.

    python benchmarks/lora_path_experiments.py --workdir /tmp/lfbench

A diagnostic for the performance report, not a benchmark of record and not run in CI. It swaps
`FusedLoraLinear.forward` *in this process only* (the library is not changed) for variants that
compute the same thing, checks they give the same logits, and times decode steps and a prefill
against the base model, interleaved over several rounds:

* current: the library's forward (F.linear(x, A); * scales; F.linear(h, B); result + delta).
* bt: B kept transposed and contiguous, (R, out), so the second product is h @ B^T as a plain
  row-major GEMM instead of `F.linear` over a (out, R) matrix with a short inner dimension.
* bt+addmm: as bt, and the addition folded into the GEMM: addmm(result, h, B^T).
* bt+addmm_: as bt, accumulated in place into the base output: result.addmm_(h, B^T) (inference).
* bt+bf16: as bt with A and B^T stored in bfloat16 (half the bytes to stream per token); the
  products run in bf16 and are added to the fp32 result. Not exact: the logit difference is shown.
* bt+addmm+sharedA: as bt+addmm, and modules that read the same input tensor (q/k/v, gate/up)
  share one GEMM against their stacked A matrices (cached per layer call by the tensor's identity).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ModelSpec, build_assets, set_threads  # noqa: E402

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def install(model, variant: str) -> None:
    """Prepare per-layer tensors for `variant` and swap FusedLoraLinear.forward (process-local)."""
    import torch
    import torch.nn.functional as F

    from loraflow.core.fused_linear import FusedLoraLinear

    if not hasattr(FusedLoraLinear, "_library_forward"):
        FusedLoraLinear._library_forward = FusedLoraLinear.forward
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    for m in fused:
        m._Bt = m.lora_B.detach().t().contiguous()  # (R, out)
        if variant == "bt+bf16":
            m._A16, m._Bt16 = m.lora_A.detach().bfloat16(), m._Bt.bfloat16()
    if variant == "bt+addmm+sharedA":
        by_layer: dict = {}
        for m in fused:
            by_layer.setdefault(id(m.mixer), {})[m.module_key] = m
        for layer in by_layer.values():
            for group in GROUPS:
                members = [layer[k] for k in group if k in layer]
                stacked = torch.cat([m.lora_A.detach() for m in members], 0)  # (sum R, in)
                start = 0
                for m in members:
                    r = m.lora_A.shape[0]
                    m._group = (group, stacked, slice(start, start + r))
                    start += r

    def current(self, x):
        return FusedLoraLinear._library_forward(self, x)

    def bt(self, x):
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self)
        if scales is None:
            return result
        h = F.linear(x, self.lora_A) * scales  # (..., R)
        return result + torch.matmul(h, self._Bt)  # (..., out)

    def bt_bf16(self, x):
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self)
        if scales is None:
            return result
        h = F.linear(x.bfloat16(), self._A16) * scales.bfloat16()  # (..., R)
        return result + torch.matmul(h, self._Bt16)  # bf16 delta promoted on the fp32 add

    def bt_addmm(self, x):
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self)
        if scales is None:
            return result
        h = F.linear(x, self.lora_A) * scales  # (..., R)
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), self._Bt)
        return out.view(result.shape)

    def bt_addmm_inplace(self, x):
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self)
        if scales is None:
            return result
        h = F.linear(x, self.lora_A) * scales  # (..., R)
        result.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), self._Bt)
        return result

    def shared_a(self, x):
        result = self.base_layer(x)
        scales = self.mixer.column_scales(self)
        if scales is None:
            return result
        group = getattr(self, "_group", None)
        if group is None:
            h = F.linear(x, self.lora_A)
        else:
            name, stacked, cols = group
            key = ("sharedA", name, id(x))
            h_all = self.mixer._cache.get(key)
            if h_all is None:
                h_all = self.mixer._cache[key] = F.linear(x, stacked)  # (..., sum R)
            h = h_all[..., cols]
        h = h * scales
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), self._Bt)
        return out.view(result.shape)

    FusedLoraLinear.forward = {"current": current, "bt": bt, "bt+addmm": bt_addmm, "bt+addmm_": bt_addmm_inplace, "bt+bf16": bt_bf16,
                               "bt+addmm+sharedA": shared_a}[variant]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 8])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["current", "bt", "bt+addmm", "bt+addmm+sharedA", "bt+bf16"])
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from loraflow import LoraFlowModel

    set_threads(args.threads)
    spec = ModelSpec.quick() if args.quick else ModelSpec()
    assets = build_assets(args.workdir, spec, max(args.ks), args.seed)
    base = AutoModelForCausalLM.from_pretrained(assets["base"]).eval()
    flows = {k: LoraFlowModel.from_pretrained(assets["base"], {f"a{i}": assets["adapters"][i] for i in range(k)},
                                              seed=args.seed, gate_init_std=0.02).eval() for k in args.ks}
    variants = args.variants
    gen = torch.Generator().manual_seed(args.seed)

    # same logits?
    ids = torch.randint(3, spec.vocab_size, (2, 16), generator=gen)
    for k, m in flows.items():
        ref = None
        for v in variants:
            install(m, v)
            with torch.inference_mode():
                logits = m(input_ids=ids).logits
            ref = logits if ref is None else ref
            print(f"k={k} {v:18s} max |logits - current| = {(logits - ref).abs().max().item():.2e}")

    for batch in args.batch_sizes:
        prompt = torch.randint(3, spec.vocab_size, (batch, args.prompt_len), generator=gen)
        mask = torch.ones(batch, args.prompt_len + 1, dtype=torch.long)
        setups = [("base", base, None)] + [(f"loraflow{k} {v}", m, v) for k, m in flows.items() for v in variants]
        step_t = {name: [] for name, _, _ in setups}
        prefill_t = {name: [] for name, _, _ in setups}
        for _ in range(args.rounds):
            for name, model, variant in setups:
                if variant:
                    install(model, variant)
                with torch.inference_mode():
                    t = time.perf_counter()
                    out = model(input_ids=prompt, attention_mask=mask[:, :-1], use_cache=True)
                    prefill_t[name].append(time.perf_counter() - t)
                    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    times = []
                    for i in range(args.steps + 1):
                        t = time.perf_counter()
                        model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                        times.append(time.perf_counter() - t)
                        cache.crop(-1)
                    step_t[name].append(statistics.median(times[1:]))
        b_step, b_pre = statistics.median(step_t["base"]), statistics.median(prefill_t["base"])
        print(f"\nbatch {batch}: decode step and prefill ({args.prompt_len} tokens) medians over {args.rounds} rounds")
        print(f"  {'variant':28s} {'step ms':>8s} {'vs base':>8s} {'+ms':>7s}   {'prefill ms':>10s} {'vs base':>8s}")
        for name in step_t:
            s, pf = statistics.median(step_t[name]), statistics.median(prefill_t[name])
            print(f"  {name:28s} {s * 1e3:8.2f} {b_step / s:7.2f}x {(s - b_step) * 1e3:+7.2f}   "
                  f"{pf * 1e3:10.1f} {b_pre / pf:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
