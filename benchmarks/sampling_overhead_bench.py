"""What the per-request sampling features cost the decode step: plain greedy rows against
rows drawn at a temperature with top-k and top-p, rows with penalties and logprobs, and
rows under a grammar (structured output), on one served engine in one run.

    python benchmarks/sampling_overhead_bench.py --config qwen3-30b-a3b-dummy --layers 16
    python benchmarks/sampling_overhead_bench.py --config tiny --batch 8 --output-len 16

Each mode generates ``--batch`` fresh prompts of ``--input-len`` tokens twice, once with
``--output-len`` new tokens and once with 1 (offline ``LLM.generate``, attached to the
served engine); the decode step is the difference over the extra steps. The grammar is a
regex no output of this length can complete (so every row runs to ``--output-len``).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import serve_bench  # noqa: E402

from raymoe.actors.engine.grammar import GrammarSpec  # noqa: E402
from raymoe.actors.engine.request import SamplingParams  # noqa: E402

LONG_REGEX = "[a-z ]{20000}"


def modes(output_len: int, batch: int) -> dict[str, list[SamplingParams]]:
    base = dict(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    plain = SamplingParams(**base)
    controls = SamplingParams(
        **base, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1, logit_bias=((7, 2.0),), logprobs=5
    )
    grammar = SamplingParams(**base, grammar=GrammarSpec("regex", LONG_REGEX))
    drawn = [
        SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.8, top_p=0.95, top_k=50, seed=i)
        for i in range(batch)
    ]
    return {
        "plain": [plain] * batch,
        "top-k + top-p draws, every row": drawn,
        "penalties + logprobs, every row": [controls] * batch,
        "grammar, one row": [grammar] + [plain] * (batch - 1),
        "grammar, every row": [grammar] * batch,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=YAML")
    args = p.parse_args()

    from raymoe.deploy.llm import LLM

    rows = []
    with serve_bench.served_controller(args.config, args.layers, args.set) as (_, _, controller):
        llm = LLM(controller=controller)
        try:
            rng = random.Random(0)
            for name, params in modes(args.output_len, args.batch).items():
                step = serve_bench.offline_decode_step_s(
                    llm,
                    params,
                    input_len=args.input_len,
                    output_len=args.output_len,
                    vocab_size=args.vocab_size,
                    rng=rng,
                )
                rows.append((name, step))
        finally:
            llm.shutdown()
    plain = rows[0][1]
    print(f"## sampling_overhead_bench: {args.config} ({args.layers or 'all'} layers), batch {args.batch}, ", end="")
    print(f"{args.input_len} in / {args.output_len} out\n")
    print("| rows | decode step ms | x plain |\n|---|---|---|")
    for name, step in rows:
        print(f"| {name} | {step * 1e3:.3f} | {step / plain:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
