"""lm-eval-harness against a running ``raymoe serve``: one loglikelihood task and one
generate-until task through ``local-completions``, and the generate-until task through
``local-chat-completions``. Checks that the harness runs to the end (on the built-in random
model the scores mean nothing). Needs ``pip install "lm-eval[api]" transformers`` (kept out
of raymoe's dependencies); the tasks read small local files, so no dataset is downloaded.

    raymoe serve --config tiny &
    python benchmarks/lm_eval_smoke.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import urllib.request

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
LOGLIKELIHOOD = """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GENERATE = """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(root: pathlib.Path) -> None:
    rng = random.Random(0)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(20)]
    mc = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a * b + 1)], "label": 0} for a, b in pairs]
    gen = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in pairs[:10]]
    for name, rows, kind in (("raymoe_mc", mc, LOGLIKELIHOOD), ("raymoe_gen", gen, GENERATE)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=data) + kind)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command")
    p.add_argument("--tokenizer", help="tokenizer for loglikelihood (default: the served model's directory)")
    args = p.parse_args()
    base = args.url.rstrip("/")
    card = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]
    model, tokenizer = card["id"], args.tokenizer or card["root"]
    runs = [
        ("local-completions", f"{base}/v1/completions", "raymoe_mc,raymoe_gen", [], f",tokenizer={tokenizer}"),
        ("local-chat-completions", f"{base}/v1/chat/completions", "raymoe_gen", ["--apply_chat_template"], ""),
    ]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(pathlib.Path(tmp))
        for lm, url, tasks, extra, tok in runs:
            model_args = f"model={model},base_url={url},num_concurrent=4,max_retries=1"
            if tok:
                model_args += f",tokenizer_backend=huggingface{tok}"
            cmd = [args.lm_eval, "run", "--model", lm, "--model_args", model_args, "--tasks", tasks]
            cmd += ["--include_path", tmp, *extra]
            print("$", " ".join(cmd), flush=True)
            rc = subprocess.run(cmd).returncode
            print(f"{lm}: {'ran to the end' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
            failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
