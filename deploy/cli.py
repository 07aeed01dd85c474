"""The ``raymoe`` command: ``generate`` (offline), ``serve`` (OpenAI endpoint), ``bench`` (load a URL),
``eplb`` (a running endpoint's expert load balancing).

    raymoe generate                                  # built-in tiny model on CPU, a default prompt
    raymoe generate --config cfg.yaml --prompt "Hi" --max-tokens 32 --chat
    raymoe serve [--config FILE|NAME] [--model DIR] [--address RAY] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    raymoe bench --url http://127.0.0.1:8000 --num-requests 64 --concurrency 8 --input-len 128 --output-len 64
    raymoe eplb report --url http://127.0.0.1:8000 --out eplb.png

``--config`` takes a YAML path or the name of a shipped config (``tiny``,
``qwen3-30b-a3b-2gpu``, ...). With no ``--address`` (and no RAY_ADDRESS) a local Ray
is started; under ``ray job submit`` the job's cluster is used.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

DEFAULT_PROMPT = "The capital of France is"


def build_parser() -> argparse.ArgumentParser:
    from raymoe.deploy.bench import add_bench_args
    from raymoe.deploy.eplb_cli import add_eplb_args

    parser = argparse.ArgumentParser(prog="raymoe", description="Serve Mixture-of-Experts LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub.add_parser("generate", help="complete prompts offline and print the results"))
    _serve_args(sub.add_parser("serve", help="serve the OpenAI API through Ray Serve until Ctrl-C"))
    add_bench_args(sub.add_parser("bench", help="load an OpenAI endpoint and print throughput, TTFT and ITL"))
    add_eplb_args(sub.add_parser("eplb", help="expert load balancing of a running endpoint: status, rebalance, report"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("generate", "serve"):
            return _until_stopped(generate_main if args.command == "generate" else serve_main, args)
        if args.command == "eplb":
            from raymoe.deploy.eplb_cli import eplb_main

            return eplb_main(args)
        from raymoe.deploy.bench import bench_main

        return bench_main(args)
    except Exception as e:
        from raymoe.cluster.placement import ClusterCapacityError

        cause = _cause(e)
        if isinstance(cause, ValueError):  # a user mistake (config, model, input)
            code = 2
        elif isinstance(cause, ClusterCapacityError):  # the cluster is too small for the layout
            code = 1
        else:
            raise
        # one line, no traceback (Ray's text of an actor's error is one); the traceback at debug level
        logging.getLogger(__name__).debug("raymoe %s", args.command, exc_info=e)
        print(f"raymoe {args.command}: error: {cause}", file=sys.stderr)
        return code


def _cause(e: BaseException) -> BaseException:
    """What an actor raised, where Ray wraps it in a RayTaskError (whose text is a traceback)."""
    from ray.exceptions import RayTaskError

    while isinstance(e, RayTaskError) and e.cause is not None:
        e = e.cause
    return e


# ---- generate ------------------------------------------------------------------------------


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or shipped config name (default: built-in tiny model on CPU)")
    p.add_argument("--model", help="checkpoint directory, overriding the config's model.path")
    p.add_argument("--address", help="Ray address to join (default: $RAY_ADDRESS, else a local Ray)")


def _load(args: argparse.Namespace) -> Any:
    from raymoe.cluster.config import resolve_config

    config = resolve_config(args.config)
    return config.replace({"model.path": args.model}) if args.model else config


def _generate_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--prompt", action="append", help=f"a prompt; repeat for several (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")


def generate_main(args: argparse.Namespace, stop: _Stop) -> int:
    from raymoe.actors.engine.request import SamplingParams
    from raymoe.deploy.launch import ensure_ray
    from raymoe.deploy.llm import LLM

    sampling = SamplingParams.create(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    config = _load(args)
    prompts = args.prompt or [DEFAULT_PROMPT]
    inputs = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts
    ensure_ray(config, args.address)
    stop.install()  # again: ray.init put Ray's own SIGTERM handler in place
    with LLM(config, address=args.address) as llm:
        results = llm.generate(inputs, sampling)
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        print(f"[{i}] prompt: {prompt!r}")
        print(f"[{i}] output: {r.text!r}  ({len(r.token_ids)} tokens, finish_reason={r.finish_reason})")
    return 0


# ---- serve ---------------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--host", help="interface to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: serve.port, 8000; 0 = any free port)")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: serve.api_key, else $RAYMOE_API_KEY); "
        "shows in ps: prefer $RAYMOE_API_KEY or --api-key-file",
    )
    p.add_argument("--api-key-file", help="read the API key from this file (its first line)")
    p.add_argument("--model-name", help="the name clients send as 'model' (default: serve.model_name, else model.path)")
    p.add_argument("--num-replicas", type=int, help="ingress replicas (default: serve.num_replicas, 1)")


def _read_key(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        key = pathlib.Path(path).read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise ValueError(f"--api-key-file: cannot read a key from {path!r}") from None
    if not key:
        raise ValueError(f"--api-key-file: {path!r} holds no key")
    return key


def serve_main(args: argparse.Namespace, stop: _Stop) -> int:
    import ray

    from raymoe.deploy.launch import ensure_ray
    from raymoe.deploy.serve_app import (
        AlreadyServingError,
        api_key_from_env,
        claim_port,
        start_serving,
        stop_serving,
    )

    config = _load(args)
    api_key = args.api_key or _read_key(args.api_key_file) or config.serve.api_key or api_key_from_env()
    overrides = {
        "serve.api_key": api_key,
        "serve.host": args.host,
        "serve.port": args.port,
        "serve.model_name": args.model_name,
        "serve.num_replicas": args.num_replicas,
    }
    config = config.replace({k: v for k, v in overrides.items() if v is not None})
    try:
        config = claim_port(config)  # before starting Ray: a taken port is refused at once
        ensure_ray(config, args.address)
        stop.install()  # again: ray.init put Ray's own SIGTERM handler (a stack dump) in place
        url = start_serving(config, args.address)
        stop.serving = True
        name = config.serve.model_name or config.model.path
        more = (
            f" (and the next {config.serve.num_replicas - 1} ports: one per ingress replica)"
            if (config.serve.direct_ingress and config.serve.num_replicas > 1)
            else ""
        )
        print(f"raymoe: serving {name!r} at {url}/v1{more} (Ctrl-C to stop)", flush=True)
        while not stop.requested.wait(1.0):
            pass
        print("raymoe: stopping", flush=True)
    except AlreadyServingError:
        ray.shutdown()  # the application running is another raymoe serve's: left as it is
        raise
    finally:
        if ray.is_initialized():
            stop_serving()
            ray.shutdown()
    print("raymoe: stopped", flush=True)
    return 0


class _Stop:
    """What SIGINT and SIGTERM (Ctrl-C, ``ray job stop``, a pod's termination) do to a command.
    Until ``serving`` is set (starting Ray, loading the model, generating) the first one raises
    KeyboardInterrupt in the main thread, so the command unwinds with the cleanup an error gets;
    once serving it sets ``requested``, which ends the serve loop. A second Ctrl-C gives up on a
    clean exit (KeyboardInterrupt); a second SIGTERM is ignored."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first signal
        self.again = False  # a second Ctrl-C came
        self.serving = False
        self.requested = threading.Event()

    def install(self) -> None:
        """Install the handlers; again after ``ray.init``, which replaces SIGTERM's."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self.requested.set()
            if not self.serving:
                raise KeyboardInterrupt
        elif signum == signal.SIGINT:
            self.again = True
            raise KeyboardInterrupt


def _until_stopped(run: Callable[[argparse.Namespace, _Stop], int], args: argparse.Namespace) -> int:
    """``run(args, stop)`` under a ``_Stop``. Interrupted by a signal before it served (or while
    generating), it says so in one line and exits as that signal's death would (130: SIGINT,
    143: SIGTERM), after the same cleanup as a stop; a serve stopped while serving exits 0. The
    handlers before it are back afterwards (``main`` may run inside another program, a test)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = _Stop()
    stop.install()
    try:
        return run(args, stop)
    except KeyboardInterrupt:
        if stop.signum is None:  # not from a signal of ours
            raise
        name = signal.Signals(stop.signum).name
        what = "a second SIGINT: exited without stopping cleanly" if stop.again else "stopped"
        print(f"raymoe {args.command}: interrupted by {name}; {what}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for signum, handler in before.items():
            if handler is not None:  # None: not installed from Python, nothing to put back
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
