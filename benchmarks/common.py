"""Shared pieces of the benchmark scripts: the benchmark model, PEFT adapters, memory, report sections.

The benchmark model is a random Llama-shaped decoder built from a config with a fixed seed (nothing
is downloaded), saved once to a directory, and loaded from there by every measured configuration,
so all configurations pay the same loading path. Adapters are real PEFT LoRA directories with
random non-zero A and B on all seven projections.

Not part of the package and not run in CI: `benchmarks/inference.py` and `benchmarks/train_memory.py`
import this file from their own directory.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "BENCHMARKS.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSpec:
    """Shape of the random Llama-shaped benchmark model (fp32)."""

    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    vocab_size: int = 8000
    lora_rank: int = 16
    lora_alpha: int = 32

    @classmethod
    def quick(cls) -> ModelSpec:
        """A small model for smoke runs (same code paths, seconds instead of minutes)."""
        return cls(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)

    def describe(self) -> str:
        return (f"Llama-shaped, hidden {self.hidden_size}, intermediate {self.intermediate_size}, "
                f"{self.num_hidden_layers} layers, {self.num_attention_heads} heads, vocab {self.vocab_size}, fp32; "
                f"LoRA rank {self.lora_rank} (alpha {self.lora_alpha}) on {', '.join(TARGETS)}")


def set_threads(threads: int) -> None:
    """Fix the intra-op thread count (call before heavy work) and use one inter-op thread."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker subprocess: offline, fixed OpenMP/MKL threads."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    return env


# ----------------------------------------------------------------------------- model and adapters
def build_assets(workdir: Path, spec: ModelSpec, num_adapters: int, seed: int) -> dict:
    """Build (or reuse) the benchmark model in workdir/base and adapters workdir/lora{i}.

    Returns {"base": path, "adapters": [paths], "adapter_bytes": [bytes per adapter]}.
    A `spec.json` records what was built; a directory built for another spec or seed is rebuilt.
    """
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / "spec.json"
    wanted = {"spec": asdict(spec), "seed": seed}
    base_dir = workdir / "base"
    adapter_dirs = [workdir / f"lora{i}" for i in range(num_adapters)]
    fresh = not marker.is_file() or json.loads(marker.read_text()) != wanted
    if fresh or not (base_dir / "config.json").is_file() or not all(
            (d / "adapter_model.safetensors").is_file() for d in adapter_dirs):
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_attention_heads, vocab_size=spec.vocab_size,
            max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(str(base_dir))
        lora_cfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=TARGETS,
                              lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora_cfg)
        for i, out in enumerate(adapter_dirs):
            torch.manual_seed(seed + 1 + i)
            with torch.no_grad():  # random non-zero A and B, deltas big enough to change the output
                for name, p in peft_model.named_parameters():
                    if "lora_A" in name:
                        p.normal_(0.0, p.shape[1] ** -0.5)
                    elif "lora_B" in name:
                        p.normal_(0.0, 0.5 * p.shape[1] ** -0.5)
            peft_model.save_pretrained(str(out))
        del peft_model, model
        marker.write_text(json.dumps(wanted))
    return {"base": str(base_dir), "adapters": [str(d) for d in adapter_dirs],
            "adapter_bytes": [tensor_bytes(d / "adapter_model.safetensors") for d in adapter_dirs]}


def build_assets_in_subprocess(workdir: Path, spec: ModelSpec, num_adapters: int, seed: int, threads: int) -> dict:
    """`build_assets` in a fresh interpreter, so that the launching process stays small (see peak_rss_bytes)."""
    args = ["--build", str(workdir), "--spec", json.dumps(asdict(spec)), "--num-adapters", str(num_adapters),
            "--seed", str(seed)]
    result = run_worker(Path(__file__), args, threads)
    if "error" in result:
        raise RuntimeError(f"building the benchmark model failed: {result['error']}")
    return result


def tensor_bytes(safetensors_file: Path) -> int:
    """Bytes of the tensors stored in a safetensors file (the adapter's own weight bytes)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(safetensors_file), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            n = 1
            for s in t.get_shape():
                n *= s
            total += n * {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
    return total


# ----------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux).

    Caveat: a child's ru_maxrss starts at its parent's peak at the time of the fork (Linux carries the
    pre-exec high-water mark over), so the process that launches workers must stay small; ours never
    imports torch.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def page_in(model) -> None:
    """Read every parameter and buffer once, so that memory-mapped weights become resident.

    transformers 5 memory-maps safetensors files: right after `from_pretrained` most weights are not
    yet in RSS, and they would be counted only as the first forward touches them.
    """
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                t.float().sum() if t.is_floating_point() else t.sum()


def reset_phase_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to the current RSS; False if not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase_peak_bytes() -> int:
    """VmHWM: the peak RSS since the last `reset_phase_peak` (or since the process started)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def at_least(low: int):
    """An argparse type: a whole number >= low (argparse then exits 2 with a one-line error)."""
    import argparse

    from loraflow.common.checks import check_int

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        try:
            return check_int("value", number, low=low)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None

    return parse


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


# ----------------------------------------------------------------------------- workers
def run_worker(script: Path, args: list[str], threads: int, timeout: float | None = None) -> dict:
    """Run `script --worker ...` in a fresh interpreter; return the JSON object on its last stdout line."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"worker exited with {proc.returncode}: {tail or proc.stdout[-500:]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- report
def machine_info(threads: int, seed: int) -> dict[str, str]:
    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs visible)",
        "threads": f"{threads} intra-op (torch.set_num_threads, OMP/MKL_NUM_THREADS), 1 inter-op",
        "versions": f"python {platform.python_version()}, torch {version('torch')}, "
                    f"transformers {version('transformers')}, peft {version('peft')}",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "seed": str(seed),
        "code": _git_commit(),
        "load": "load average {:.2f} {:.2f} {:.2f} at the start (the machine may be shared)".format(*os.getloadavg()),
    }


def _git_commit() -> str:
    """The repository's HEAD, flagged when src/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- {name}:start -->` and `<!-- {name}:end -->` in `path`.

    Other sections are kept; the section is appended when the markers are absent, and the file is
    created (with a title) when it does not exist.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# loraflow benchmarks\n"
    i, j = text.find(start), text.find(end)
    if i != -1 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _main() -> None:  # `python common.py --build DIR --spec JSON --num-adapters N --seed S`
    import argparse

    p = argparse.ArgumentParser(description="build the benchmark model and adapters (used by the scripts)")
    p.add_argument("--build", type=Path, required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--num-adapters", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    set_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(build_assets(a.build, ModelSpec(**json.loads(a.spec)), a.num_adapters, a.seed)))


if __name__ == "__main__":
    _main()
