"""FlashInfer's paged decode on one GPU with and without tensor cores, per batch and KV
cache dtype (bf16, or FP8 read with bf16 queries: engine.kv_cache_dtype), at the engine
benchmark's attention shape (32 query / 4 KV heads, head_dim 128, pages of 16, context
1024), with the CUDA-graph wrapper the engine captures. Reports microseconds and the KV
read rate; the engine uses tensor cores when a KV head serves at least 4 query heads
(attention_flashinfer.py).

    python3 benchmarks/decode_attention_bench.py --batches 1,4,16,64,256 --kv-dtypes bf16,fp8
"""

from __future__ import annotations

import argparse

import torch
from expert_mlp_bench import graph_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--kv-dtypes", default="bf16", help="comma list of bf16, fp8")
    args = p.parse_args()
    import flashinfer

    dev, bf = torch.device("cuda"), torch.bfloat16
    block, heads, kv_heads, dim = 16, 32, 4, 128
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    kv_dtypes = {"bf16": bf, "fp8": torch.float8_e4m3fn}
    print("| batch | KV cache | KV MB | tensor cores us | CUDA cores us | best TB/s |\n|---|---|---|---|---|---|")
    for b, name in [(int(x), n) for x in args.batches.split(",") for n in args.kv_dtypes.split(",")]:
        pages = -(-args.context // block)
        kv_dtype = kv_dtypes[name]
        cache = torch.randn(b * pages, 2, block, kv_heads, dim, device=dev, dtype=bf).to(kv_dtype)
        q = torch.randn(b, heads, dim, device=dev, dtype=bf)
        times = []
        for tensor_cores in (True, False):
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(b * pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=dev),
            )
            last = args.context - (pages - 1) * block
            wrapper.plan(
                torch.arange(b + 1, dtype=torch.int32) * pages,
                torch.randperm(b * pages, dtype=torch.int32).to(dev),
                torch.full((b,), last, dtype=torch.int32),
                heads,
                kv_heads,
                dim,
                block,
                q_data_type=bf,
                kv_data_type=kv_dtype,
            )
            times.append(graph_time(lambda w=wrapper: w.run(q, cache)))
        kv = b * args.context * kv_heads * dim * 2 * cache.element_size()
        us = " | ".join(f"{t * 1e6:.1f}" for t in times)
        print(f"| {b} | {name} | {kv / 1e6:.1f} | {us} | {kv / min(times) / 1e12:.2f} |", flush=True)


if __name__ == "__main__":
    main()
