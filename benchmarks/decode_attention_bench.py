"""Paged decode attention on one GPU, per batch and KV cache dtype (bf16, or FP8 read with
bf16 queries: engine.kv_cache_dtype): FlashInfer's with and without tensor cores (its
CUDA-graph wrapper, as the engine captures it) and raymoe's Triton kernel
(decode_attention_triton.py), at the engine benchmark's attention shape (32 query / 4 KV
heads, head_dim 128, pages of 16, context 1024 or as asked, optionally one longer sequence
first), each in a CUDA graph. Reports microseconds,
the KV read rate of the fastest, and the Triton kernel's largest difference from
FlashInfer's output. The engine's decode steps run the Triton kernel (attention_flashinfer.py;
BENCHMARKS.md, "Decode attention in Triton").

    python3 benchmarks/decode_attention_bench.py --batches 1,4,16,64,256 --kv-dtypes bf16,fp8
    python3 benchmarks/decode_attention_bench.py --batches 1,8 --context 32768
    python3 benchmarks/decode_attention_bench.py --batches 8,128 --long 32768
"""

from __future__ import annotations

import argparse
import itertools

import torch
from expert_mlp_bench import graph_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--long", type=int, default=0, help="the first sequence holds this many tokens (a skewed batch)")
    p.add_argument("--kv-dtypes", default="bf16", help="comma list of bf16, fp8")
    p.add_argument("--sweep", action="store_true", help="also time the Triton kernel's block sizes and parts")
    args = p.parse_args()
    import flashinfer

    from raymoe.actors.engine.decode_attention_triton import TritonDecode

    dev, bf = torch.device("cuda"), torch.bfloat16
    block, heads, kv_heads, dim = 16, 32, 4, 128
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    kv_dtypes = {"bf16": bf, "fp8": torch.float8_e4m3fn}
    print(
        "| batch | KV cache | KV MB | FlashInfer tensor cores us | FlashInfer CUDA cores us | Triton us | Triton parts "
        "| best TB/s | Triton max diff |\n|---|---|---|---|---|---|---|---|---|"
    )
    for b, name in [(int(x), n) for x in args.batches.split(",") for n in args.kv_dtypes.split(",")]:
        lens_host = torch.full((b,), args.context, dtype=torch.int32)
        if args.long:
            lens_host[0] = args.long
        seq_pages = (lens_host + block - 1) // block
        total_pages = int(seq_pages.sum())
        kv_dtype = kv_dtypes[name]
        cache = torch.randn(total_pages, 2, block, kv_heads, dim, device=dev, dtype=bf).to(kv_dtype)
        q = torch.randn(b, heads, dim, device=dev, dtype=bf)
        times, outs = [], []
        indptr = torch.cat([torch.zeros(1, dtype=torch.int32), seq_pages.cumsum(0).to(torch.int32)])
        indices = torch.randperm(total_pages, dtype=torch.int32).to(dev)
        for tensor_cores in (True, False):
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(total_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=dev),
            )
            wrapper.plan(
                indptr,
                indices,
                lens_host - (seq_pages - 1) * block,
                heads,
                kv_heads,
                dim,
                block,
                q_data_type=bf,
                kv_data_type=kv_dtype,
            )
            times.append(graph_time(lambda w=wrapper: w.run(q, cache)))
            outs.append(wrapper.run(q, cache))
        indices_host = indices.cpu()

        def triton_decode(**kwargs) -> TritonDecode:
            decode = TritonDecode(b, total_pages, kv_heads, dev, **kwargs)
            decode.plan(indptr, indices_host, lens_host)
            return decode

        decode = triton_decode()
        times.append(graph_time(lambda: decode.run(q, cache)))
        diff = (decode.run(q, cache).float() - outs[0].float()).abs().max().item()
        kv = int(lens_host.sum()) * kv_heads * dim * 2 * cache.element_size()
        us = " | ".join(f"{t * 1e6:.1f}" for t in times)
        parts = int(decode.first_part[-1])
        print(
            f"| {b} | {name} | {kv / 1e6:.1f} | {us} | {parts} | {kv / min(times) / 1e12:.2f} | {diff:.1e} |",
            flush=True,
        )
        if args.sweep:
            sweep(lambda config, target: triton_decode(config=config, target_programs=target), q, cache)


def sweep(make, q: torch.Tensor, cache: torch.Tensor) -> None:
    """The Triton kernel's five fastest configs (BT, warps, stages, programs aimed at) for one
    case; make(config, target_programs) -> a planned TritonDecode."""
    results = []
    for bt, warps, stages, target in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), (132, 264, 528)):
        config = dict(BT=bt, num_warps=warps, num_stages=stages)
        try:
            decode = make(config, target)
            results.append((graph_time(lambda d=decode: d.run(q, cache)), config, target))
        except Exception as e:  # noqa: BLE001 -- a config the compiler refuses (shared memory)
            print(f"  {config} programs {target}: {type(e).__name__}")
    for t, config, target in sorted(results, key=lambda r: r[0])[:5]:
        print(f"  {t * 1e6:.1f} us  {config} programs {target}", flush=True)


if __name__ == "__main__":
    main()
