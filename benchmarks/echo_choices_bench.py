"""lm-eval-style completions (echo, logprobs) with n choices of one long prompt, against a
running endpoint: the request's wall time, and that of a short request sent while it runs.

    raymoe serve &   # the built-in tiny model on CPU
    python benchmarks/echo_choices_bench.py [--url http://127.0.0.1:8000/v1] [--n 1 16 64] [--words 400]

Also prints whether every choice echoed the same prompt logprobs.
"""

from __future__ import annotations

import argparse
import threading
import time

import openai


def run(client: openai.OpenAI, model: str, prompt: str, n: int) -> tuple[int, float, float, bool]:
    """(prompt tokens, the request's seconds, a short request's seconds sent 0.2 s into it, same logprobs)."""
    short: list[float] = []

    def meanwhile() -> None:
        time.sleep(0.2)
        t = time.perf_counter()
        client.completions.create(model=model, prompt="hi", max_tokens=4)
        short.append(time.perf_counter() - t)

    other = threading.Thread(target=meanwhile)
    other.start()
    t = time.perf_counter()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, logprobs=1, echo=True, n=n, temperature=0)
    seconds = time.perf_counter() - t
    other.join()
    echoed = [c.logprobs.token_logprobs[: r.usage.prompt_tokens] for c in r.choices]
    return r.usage.prompt_tokens, seconds, short[0], all(e == echoed[0] for e in echoed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--n", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--words", type=int, default=400, help="prompt of this many distinct words")
    args = p.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    client.completions.create(model=model, prompt="warm up", max_tokens=2)
    prompt = " ".join(f"w{i}" for i in range(args.words))
    print("| n | prompt tokens | request s | short request meanwhile s | choices echo the same logprobs |")
    print("|---|---|---|---|---|")
    for n in args.n:
        tokens, seconds, short, same = run(client, model, prompt, n)
        print(f"| {n} | {tokens} | {seconds:.2f} | {short:.2f} | {same} |")


if __name__ == "__main__":
    main()
