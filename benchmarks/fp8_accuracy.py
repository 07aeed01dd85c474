"""FP8 against bf16 on the same random model: log-probabilities over teacher-forced positions.

Writes a random-weight checkpoint of a real shape (transformers' own initialisation, bf16,
``--layers`` of it) and an FP8 copy in the Hub's format (128 x 128 blocks by default, float32
``weight_scale_inv``), then runs the same prompts through three engines and reads every
prompt position's log-probabilities (``prompt_logprobs``: the context is the prompt, the
same for all three):

* ``bf16``: the bf16 checkpoint;
* ``dequantised``: the FP8 checkpoint dequantised to bf16 at load (``quantization: none``):
  the weights' quantisation error alone, the reference's own error;
* ``fp8``: the FP8 checkpoint kept in FP8 (``quantization: fp8``): on GPUs the FP8 kernels,
  which quantise activations too (on CPU the same maths as ``dequantised``);
* ``fp8+kv8`` (with ``--kv8``): that, and the KV cache in FP8 (``engine.kv_cache_dtype: fp8``).

For each against bf16: the mean and max absolute difference of the log-probability of each
position's token (and the mean as a multiple of the dequantised weights' own: what the FP8
activations add), and how often the most likely next token agrees.

    python benchmarks/fp8_accuracy.py --layers 8 --positions 1000           # a GPU
    python benchmarks/fp8_accuracy.py --model tiny --block 32 --positions 200 --device cpu
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time

import torch

from raymoe.actors.models.builtin import QWEN3_30B_A3B, ensure_builtin
from raymoe.actors.models.fp8 import quantize_blocks

STARTED = time.perf_counter()
# The FP8 kernels add the activations' rounding (1 x 128 groups, e4m3) to the weights' (128 x 128
# blocks, e4m3: the dequantised reference's own error). Two independent roundings of the same
# relative size make sqrt(2) = 1.41 x one of them; fp8's mean difference may be at most this much
# of the dequantised weights'.
BOUND = 1.5
# An FP8 KV cache rounds keys and values as well (e4m3, scale 1): a third rounding of about the same
# relative size, sqrt(3) = 1.73 x one.
KV8_BOUND = 1.8


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["qwen3-30b-a3b", "tiny"], default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--positions", type=int, default=1000, help="teacher-forced positions, over prompts of 250")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--block", type=int, default=128, help="the FP8 blocks' rows and columns (the Hub's: 128)")
    p.add_argument("--dir", help="keep the checkpoints here (default: a temporary directory)")
    p.add_argument("--kv8", action="store_true", help="also run fp8 with an FP8 KV cache (fp8+kv8)")
    return p.parse_args()


def write_checkpoints(args, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """-> (the bf16 checkpoint, its FP8 copy)."""
    import transformers
    from safetensors.torch import load_file, save_file

    tokenizer_dir = ensure_builtin("tiny-qwen3-moe")
    if args.model == "tiny":
        shape = json.loads((tokenizer_dir / "config.json").read_text())
    else:
        shape = dict(QWEN3_30B_A3B)
    shape = dict(shape, num_hidden_layers=args.layers)
    bf16, fp8 = root / "bf16", root / "fp8"
    config = transformers.AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    config.architectures = shape["architectures"]
    torch.manual_seed(0)
    with torch.device(args.device):  # initialising and quantising on a GPU takes seconds, not minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(bf16)
    del model
    progress("wrote the bf16 checkpoint")
    tensors = {}
    for f in sorted(bf16.glob("*.safetensors")):
        tensors.update(load_file(f, device=args.device))
    for name in [n for n, w in tensors.items() if n.endswith("_proj.weight") and w.dim() == 2]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(tensors[name], (args.block, args.block))
    fp8.mkdir(parents=True, exist_ok=True)
    save_file({name: t.cpu() for name, t in tensors.items()}, str(fp8 / "model.safetensors"))
    progress("wrote the FP8 checkpoint")
    quant = {"quant_method": "fp8", "weight_block_size": [args.block] * 2, "activation_scheme": "dynamic"}
    cfg = json.loads((bf16 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    for d in (bf16, fp8):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, d / name)
    return bf16, fp8


def position_logprobs(path, quantization: str, prompts, device: str, kv: str = "auto") -> list[tuple[int, float]]:
    """(most likely next token, log-probability of the actual token) at every position but
    each prompt's first."""
    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy import LLM, SamplingParams

    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "bfloat16", "quantization": quantization, "max_model_len": 512},
            "parallel": {"device": device},
            # prompt log-probabilities are prefill steps only: no decode graphs to capture
            "engine": {"num_kv_blocks": 256, "max_num_seqs": 8, "cuda_graphs": False, "kv_cache_dtype": kv},
        }
    )
    with LLM(config) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    progress(f"ran {path.name} with quantization: {quantization}, kv_cache_dtype: {kv}")
    return [(entry.top[0][0], entry.logprob) for out in outs for entry in out.prompt_logprobs[1:]]


def progress(what: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> None:
    args = parse()
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="fp8-accuracy-"))
    bf16, fp8 = write_checkpoints(args, root)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the engines' rank actors need the memory
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(251)] for _ in range(-(-args.positions // 250))]
    runs = {
        "bf16": position_logprobs(bf16, "none", prompts, args.device),
        "dequantised": position_logprobs(fp8, "none", prompts, args.device),
        "fp8": position_logprobs(fp8, "fp8", prompts, args.device),
    }
    if args.kv8:
        runs["fp8+kv8"] = position_logprobs(fp8, "fp8", prompts, args.device, kv="fp8")
    base = runs["bf16"]
    print(f"{args.model} shape, {args.layers} layers, {len(base)} positions, {args.device}\n")
    print("| weights | mean abs logprob diff vs bf16 | x dequantised's | max | top-1 agreement |")
    print("|---|---|---|---|---|")
    reference, ratios = None, {}
    for name in [n for n in runs if n != "bf16"]:
        diff = torch.tensor([abs(a[1] - b[1]) for a, b in zip(runs[name], base)])
        agree = sum(a[0] == b[0] for a, b in zip(runs[name], base)) / len(base)
        reference = reference or diff.mean().item()
        ratios[name] = diff.mean().item() / reference if reference else float("nan")
        print(f"| {name} | {diff.mean():.4f} | {ratios[name]:.2f} | {diff.max():.4f} | {agree:.1%} |")
    if not args.dir:
        shutil.rmtree(root)
    ok = True
    for name, bound in (("fp8", BOUND), ("fp8+kv8", KV8_BOUND)):
        if name in ratios:
            verdict = "within" if ratios[name] <= bound else "OVER"
            ok &= ratios[name] <= bound
            print(f"{name} at {ratios[name]:.2f} x the dequantised weights' mean difference: {verdict} {bound} x")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
