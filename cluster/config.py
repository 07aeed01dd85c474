"""One YAML file -> one frozen, validated dataclass tree.

Sections sit side by side: model, parallel, engine, eplb, serve. Every field is
documented in configs/README.md. A bad value raises ValueError naming the field
(``parallel.tp``) and how to fix it, before any actor starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

BUILTIN_PREFIX = "builtin:"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str = "builtin:tiny-qwen3-moe"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    # auto: read the checkpoint's safetensors; dummy: random weights drawn at load
    # (benchmarks on the real shape without a checkpoint; the path needs config.json only)
    load_format: Literal["auto", "dummy"] = "auto"
    # fp8: projection weights in FP8 with 128 x 128 block scales (an FP8 checkpoint's own
    # blocks; any other checkpoint quantised at load), FP8 GEMMs on GPUs, dequantised at
    # each use on CPU; none: an FP8 checkpoint dequantised to model.dtype at load; auto:
    # fp8 for an FP8 checkpoint on GPUs, none otherwise
    quantization: Literal["auto", "fp8", "none"] = "auto"

    def validate(self) -> None:
        _require(bool(self.path), "model.path", "must name a checkpoint directory or builtin:<name>")
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, "model.max_model_len", "must be >= 1 or left unset")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    nodes: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    placement_timeout_s: float = 60.0
    # small bf16 all-reduces (decode activations) of groups within one node through torch
    # symmetric memory (one-shot, no multicast) instead of NCCL; cuda only
    symmetric_memory: bool = True

    def validate(self) -> None:
        for name in ("tp", "dp", "cp", "ep", "nodes"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        _require(self.placement_timeout_s > 0, "parallel.placement_timeout_s", "must be > 0 seconds")
        # the layout does the cross-field checks (products, divisibility)
        from raymoe.cluster.layout import RankLayout

        RankLayout.from_config(self)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_memory_fraction: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    attention_backend: Literal["auto", "torch", "flashinfer"] = "auto"
    cuda_graphs: bool = True
    # with cuda_graphs, steps with prefill rows of up to this many tokens replay graphs captured
    # in pieces between the attention calls (piecewise_graphs.py); 0: they run eagerly
    mixed_step_graph_tokens: int = 8192
    # share the KV of full blocks whose tokens (and all before them) equal another request's
    prefix_caching: bool = True
    # auto: the KV cache in the model's dtype; fp8: float8_e4m3fn with scale 1 (k and v
    # saturated at +-448), half the bytes for attention to read and twice the tokens cached
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # keep steps in flight on the ranks (AsyncEngine); unset: on GPUs (where the device runs
    # asynchronously to the host), off on CPU (a launch is the whole forward there)
    pipelined_steps: Optional[bool] = None
    # with pipelined steps, the steps on the ranks when the next is planned (configs/README.md):
    # 2 queues each step before the running one ends; 1 plans it a step later, so a new
    # request's first token comes a step sooner; auto: 1 while the ranks report slack for it
    max_steps_in_flight: Literal[1, 2, "auto"] = 2
    # a step slower than this means a hung rank: the rank group restarts (the first
    # steps on new ranks get 15 minutes on GPUs, which compile kernels then, 1 on CPUs)
    step_timeout_s: float = 60.0
    # a bring-up call on a rank group's ranks (loading the weights; the KV cache and CUDA graphs)
    # slower than this means a hung rank: the start fails, a restart counts as failed
    load_timeout_s: float = 1800.0
    # rank-group restarts after failures allowed within restart_window_s; then the
    # engine stays down and says why
    max_restarts: int = 3
    restart_window_s: float = 600.0

    def validate(self) -> None:
        _require(self.block_size >= 1, "engine.block_size", "must be >= 1 (16 is typical)")
        if self.num_kv_blocks is not None:
            _require(self.num_kv_blocks >= 1, "engine.num_kv_blocks", "must be >= 1 or unset (auto)")
        _require(0 < self.kv_memory_fraction <= 1, "engine.kv_memory_fraction", "must be in (0, 1]")
        _require(self.max_num_seqs >= 1, "engine.max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens >= 1, "engine.max_num_batched_tokens", "must be >= 1")
        _require(self.mixed_step_graph_tokens >= 0, "engine.mixed_step_graph_tokens", "must be >= 0 (0: off)")
        _require(self.step_timeout_s > 0, "engine.step_timeout_s", "must be > 0 seconds")
        _require(self.load_timeout_s > 0, "engine.load_timeout_s", "must be > 0 seconds")
        _require(self.max_restarts >= 0, "engine.max_restarts", "must be >= 0 (0: never restart)")
        _require(self.restart_window_s > 0, "engine.restart_window_s", "must be > 0 seconds")


@dataclass(frozen=True, kw_only=True)
class EplbConfig:
    enabled: bool = False
    num_redundant_experts: int = 0
    rebalance_every_steps: int = 1000
    layers_per_chunk: Optional[int] = None
    # benchmarks on random weights only: bias router logits so expert popularity is
    # Zipf(skew); 0 = off. It changes the model's outputs.
    router_skew: float = 0.0
    # auto | global | hierarchical (see cluster/eplb_planner.py)
    policy: Literal["auto", "global", "hierarchical"] = "auto"
    # a layer keeps its expert slots unless its balancedness rises by at least this much
    min_improvement: float = 0.005
    # a planner that gives no plan in this long is replaced, and its rebalance skipped
    planning_timeout_s: float = 120.0

    def validate(self) -> None:
        _require(self.min_improvement >= 0, "eplb.min_improvement", "must be >= 0 (0 = move on any gain)")
        _require(self.planning_timeout_s > 0, "eplb.planning_timeout_s", "must be > 0 seconds")
        _require(self.num_redundant_experts >= 0, "eplb.num_redundant_experts", "must be >= 0")
        _require(self.rebalance_every_steps >= 1, "eplb.rebalance_every_steps", "must be >= 1")
        _require(self.router_skew >= 0, "eplb.router_skew", "must be >= 0 (0 = off)")
        if self.layers_per_chunk is not None:
            _require(
                self.layers_per_chunk >= 1,
                "eplb.layers_per_chunk",
                "must be >= 1, or left unset to move all layers at once",
            )


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None
    api_key: Optional[str] = None
    max_queued_requests: int = 1024
    # when raymoe starts Serve: the ingress replica answers on host:port itself (Ray
    # Serve's direct ingress), Serve's proxy moves to a free port
    direct_ingress: bool = True
    # ingress replicas (engine clients: tokenising, detokenising, HTTP)
    num_replicas: int = 1
    # chat answers' <think>...</think> go to reasoning_content: qwen3 | deepseek_r1 (None: off)
    reasoning_parser: Optional[Literal["qwen3", "deepseek_r1"]] = None
    # how chat models write tool calls (deploy/tool_calls.py): hermes (Qwen2.5, Qwen3, Hermes)
    tool_parser: Literal["hermes"] = "hermes"

    def validate(self) -> None:
        _require(0 <= self.port <= 65535, "serve.port", "must be a TCP port in [0, 65535]")
        _require(self.host.strip() != "", "serve.host", "must name an interface (0.0.0.0: all of them)")
        key = self.api_key
        _require(
            key is None or (key != "" and key == key.strip()),
            "serve.api_key",
            "must be non-empty, without spaces at either end (unset: no key)",
        )
        _require(self.max_queued_requests >= 1, "serve.max_queued_requests", "must be >= 1")
        _require(self.num_replicas >= 1, "serve.num_replicas", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eplb: EplbConfig = field(default_factory=EplbConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        cp, block = self.parallel.cp, self.engine.block_size
        # context parallelism puts token p of a block on cp rank p % cp: each holds block_size / cp slots
        _require(block % cp == 0, "engine.block_size", f"must be a multiple of parallel.cp ({cp}) when cp > 1")
        return self

    def replace(self, overrides: Optional[dict[str, Any]] = None, /, **more: Any) -> "Config":
        """Return a validated copy with dotted-path overrides: ``cfg.replace({"parallel.tp": 2})``."""
        data = dataclasses.asdict(self)
        for dotted, value in {**(overrides or {}), **more}.items():
            section, _, name = dotted.partition(".")
            if section not in data or name not in data[section]:
                raise ValueError(f"{dotted}: no such config field")
            data[section][name] = value
        return config_from_dict(data)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a Config from plain data (as parsed from YAML)."""
    return _build(Config, data or {}, "").validate()


def load_config(path: str | pathlib.Path | None = None) -> Config:
    """Load a YAML config file; None loads the built-in default (configs/tiny.yaml)."""
    if path is None:
        path = default_config_path()
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections (model, parallel, ...)")
    return config_from_dict(data)


def resolve_config(config: Config | str | pathlib.Path | None) -> Config:
    """A Config from a Config, a YAML path, a shipped config's name (``tiny``,
    ``qwen3-30b-a3b-8gpu``), or None (the built-in default)."""
    if config is None or isinstance(config, Config):
        return config if config is not None else load_config(None)
    path = pathlib.Path(config).expanduser()
    if not path.is_file() and not path.suffix and "/" not in str(config):
        shipped = configs_dir() / f"{config}.yaml"
        if shipped.is_file():
            path = shipped
        else:
            names = sorted(p.stem for p in configs_dir().glob("*.yaml"))
            raise ValueError(f"config: {config!r} is neither a file nor a shipped config ({', '.join(names)})")
    return load_config(path)


def configs_dir() -> pathlib.Path:
    """The shipped configs/ folder (package data ``raymoe.configs``)."""
    import importlib.util

    spec = importlib.util.find_spec("raymoe.configs")
    # a namespace package; editable installs add a non-directory path-hook entry
    for entry in spec.submodule_search_locations if spec else []:
        if pathlib.Path(entry, "tiny.yaml").is_file():
            return pathlib.Path(entry)
    raise FileNotFoundError("raymoe.configs not found: is raymoe installed?")


def default_config_path() -> pathlib.Path:
    return configs_dir() / "tiny.yaml"


def _require(ok: bool, name: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {fix}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(sorted(known))}"
            raise ValueError(f"{prefix}{key}: unknown field{hint}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(hint, value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):  # true is not 1, nor 1.0
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {hint} for {name}")
