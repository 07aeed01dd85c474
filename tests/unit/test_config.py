"""Config tree: YAML -> frozen, validated dataclasses; errors name the dotted field."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import yaml

from raymoe.cluster.config import (
    Config,
    EngineConfig,
    EplbConfig,
    ModelConfig,
    ParallelConfig,
    ServeConfig,
    config_from_dict,
    configs_dir,
    default_config_path,
    load_config,
    resolve_config,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "engine": EngineConfig,
    "eplb": EplbConfig,
    "serve": ServeConfig,
}


def _write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# ---- YAML -> tree ---------------------------------------------------------------


def test_yaml_values_land_in_their_sections(tmp_path):
    path = _write(
        tmp_path,
        """
model: {path: /ckpt/qwen, dtype: bfloat16, max_model_len: 4096, seed: 7}
parallel: {tp: 2, dp: 2, ep: 4, device: cuda, placement_timeout_s: 5}
engine: {block_size: 32, num_kv_blocks: null, cuda_graphs: false}
eplb: {enabled: true, layers_per_chunk: 3}
serve: {port: 9000, model_name: qwen}
""",
    )
    cfg = load_config(path)
    assert cfg.model == ModelConfig(path="/ckpt/qwen", dtype="bfloat16", max_model_len=4096, seed=7)
    assert cfg.parallel == ParallelConfig(tp=2, dp=2, ep=4, device="cuda", placement_timeout_s=5.0)
    assert isinstance(cfg.parallel.placement_timeout_s, float)  # an int in YAML becomes a float
    assert cfg.engine == EngineConfig(block_size=32, num_kv_blocks=None, cuda_graphs=False)
    assert cfg.eplb == EplbConfig(enabled=True, layers_per_chunk=3)
    assert cfg.serve == ServeConfig(port=9000, model_name="qwen")


def test_missing_sections_and_fields_take_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert config_from_dict(None) == Config()
    cfg = config_from_dict({"parallel": None, "serve": {"port": 1}})
    assert cfg.parallel == ParallelConfig()
    assert cfg.serve == dataclasses.replace(ServeConfig(), port=1)


def test_tree_is_frozen():
    cfg = config_from_dict({"parallel": {"tp": 2}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tp = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel = ParallelConfig()  # type: ignore[misc]
    assert cfg.parallel.tp == 2


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text()) or {}
    # every value written in the file is the value in the tree
    for section, fields in raw.items():
        for name, value in (fields or {}).items():
            assert getattr(getattr(cfg, section), name) == value, f"{path.name}: {section}.{name}"


def test_shipped_configs_exist_and_default_is_tiny():
    assert SHIPPED, "configs/ holds no YAML"
    # the installed package data (editable or not) holds the same configs as the checkout
    assert sorted(p.name for p in configs_dir().glob("*.yaml")) == [p.name for p in SHIPPED]
    assert default_config_path().name == "tiny.yaml"
    assert load_config(None) == load_config(REPO / "configs" / "tiny.yaml")


def test_resolve_config_takes_a_config_a_path_or_a_shipped_name(tmp_path, monkeypatch):
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert resolve_config(None) == resolve_config("tiny") == resolve_config(str(REPO / "configs" / "tiny.yaml")) == tiny
    assert resolve_config(tiny) is tiny
    assert resolve_config("qwen3-30b-a3b-2gpu") == load_config(REPO / "configs" / "qwen3-30b-a3b-2gpu.yaml")
    monkeypatch.chdir(tmp_path)  # a file of that name wins over the shipped config
    pathlib.Path("tiny").write_text("engine:\n  max_num_seqs: 3\n")
    assert resolve_config("tiny").engine.max_num_seqs == 3
    shipped = r"\(.*qwen3-30b-a3b-2gpu.*tiny\)$"  # the names to choose from
    with pytest.raises(ValueError, match=r"^config: 'no-such' is neither a file nor a shipped config " + shipped):
        resolve_config("no-such")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_config("no-such.yaml")


def test_llm_takes_a_shipped_config_name_as_the_cli_does(monkeypatch):
    from raymoe.deploy import llm
    from raymoe.deploy.cli import _load, build_parser

    started = []

    def start_controller(config, address):
        started.append(config)
        raise RuntimeError("stop here: no Ray in unit tests")

    monkeypatch.setattr(llm, "start_controller", start_controller)
    with pytest.raises(RuntimeError, match="stop here"):
        llm.LLM("qwen3-30b-a3b-dummy")
    assert started == [_load(build_parser().parse_args(["generate", "--config", "qwen3-30b-a3b-dummy"]))]


# ---- unknown fields, wrong types, bad files -------------------------------------------


@pytest.mark.parametrize(
    "data, dotted, suggestion",
    [
        ({"parallel": {"tpp": 2}}, "parallel.tpp", "tp"),
        ({"engine": {"block_sise": 16}}, "engine.block_sise", "block_size"),
        ({"serve": {"prot": 80}}, "serve.prot", "port"),
        ({"paralel": {"tp": 2}}, "paralel", "parallel"),
        ({"eplb": {"layers_per_chunks": 2}}, "eplb.layers_per_chunks", "layers_per_chunk"),
    ],
)
def test_unknown_field_names_dotted_path_and_close_match(data, dotted, suggestion):
    with pytest.raises(ValueError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert msg.startswith(f"{dotted}:"), msg
    assert "unknown field" in msg
    assert f"'{suggestion}'" in msg


def test_unknown_field_without_close_match_lists_known_fields():
    with pytest.raises(ValueError) as e:
        config_from_dict({"serve": {"zzzzzz": 1}})
    for name in (f.name for f in dataclasses.fields(ServeConfig)):
        assert name in str(e.value)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"parallel": {"tp": "2"}}, "parallel.tp"),
        ({"parallel": {"tp": 2.0}}, "parallel.tp"),
        ({"parallel": {"tp": True}}, "parallel.tp"),
        ({"parallel": {"device": "tpu"}}, "parallel.device"),
        ({"parallel": {"placement_timeout_s": "5s"}}, "parallel.placement_timeout_s"),
        ({"parallel": {"placement_timeout_s": True}}, "parallel.placement_timeout_s"),
        ({"model": {"dtype": "fp8"}}, "model.dtype"),
        ({"eplb": {"policy": "nodes"}}, "eplb.policy"),
        ({"model": {"path": 3}}, "model.path"),
        ({"model": {"max_model_len": "long"}}, "model.max_model_len"),
        ({"engine": {"cuda_graphs": "yes"}}, "engine.cuda_graphs"),
        ({"engine": {"cuda_graphs": 1}}, "engine.cuda_graphs"),
        ({"engine": {"attention_backend": "triton"}}, "engine.attention_backend"),
        ({"eplb": {"enabled": None}}, "eplb.enabled"),
        ({"serve": {"port": None}}, "serve.port"),
        ({"parallel": [1, 2]}, "parallel"),
        ({"engine": 4}, "engine"),
    ],
)
def test_wrong_type_names_field(data, field):
    with pytest.raises(ValueError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(f"{field}:"), str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_write(tmp_path, "parallel: {tp: [1, 2\n"))
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- tp\n- dp\n"))


# ---- validate() rules ---------------------------------------------------------------

VALIDATE_CASES = [
    ("model.path", ""),
    ("model.max_model_len", 0),
    ("parallel.tp", 0),
    ("parallel.dp", 0),
    ("parallel.cp", -1),
    ("parallel.ep", 0),
    ("parallel.nodes", 0),
    ("parallel.placement_timeout_s", 0),
    ("parallel.placement_timeout_s", -1.5),
    ("engine.block_size", 0),
    ("engine.num_kv_blocks", 0),
    ("engine.kv_memory_fraction", 0),
    ("engine.kv_memory_fraction", 1.01),
    ("engine.max_num_seqs", 0),
    ("engine.max_num_batched_tokens", 0),
    ("engine.max_steps_in_flight", 0),
    ("engine.max_steps_in_flight", 3),
    ("engine.max_steps_in_flight", True),
    ("engine.max_steps_in_flight", 1.0),
    ("engine.max_steps_in_flight", "fast"),
    ("eplb.num_redundant_experts", -1),
    ("eplb.rebalance_every_steps", 0),
    ("eplb.router_skew", -0.5),
    ("eplb.layers_per_chunk", 0),
    ("eplb.min_improvement", -0.001),
    ("eplb.planning_timeout_s", 0),
    ("serve.port", -1),
    ("serve.port", 65536),
    ("serve.host", ""),
    ("serve.api_key", ""),
    ("serve.api_key", " key"),
    ("serve.max_queued_requests", 0),
]


@pytest.mark.parametrize("dotted, value", VALIDATE_CASES, ids=[f"{d}={v}" for d, v in VALIDATE_CASES])
def test_validate_rejects_and_names_field(dotted, value):
    section, name = dotted.split(".")
    with pytest.raises(ValueError) as e:
        config_from_dict({section: {name: value}})
    assert str(e.value).startswith(f"{dotted}:"), str(e.value)


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("model.max_model_len", 1),
        ("engine.kv_memory_fraction", 1.0),
        ("engine.num_kv_blocks", 1),
        ("engine.max_steps_in_flight", 1),
        ("engine.max_steps_in_flight", "auto"),
        ("eplb.num_redundant_experts", 0),
        ("eplb.layers_per_chunk", 1),
        ("serve.port", 0),
        ("serve.port", 65535),
        ("serve.host", "0.0.0.0"),
        ("serve.api_key", "k"),
    ],
)
def test_validate_accepts_boundaries(dotted, value):
    section, name = dotted.split(".")
    cfg = config_from_dict({section: {name: value}})
    assert getattr(getattr(cfg, section), name) == value


def test_defaults_are_valid():
    assert Config().validate() == Config()
    for cls in SECTIONS.values():
        cls().validate()


# ---- layout errors surface at load ------------------------------------------------------


def test_ep_not_dividing_world_fails_at_load(tmp_path):
    with pytest.raises(ValueError) as e:
        load_config(_write(tmp_path, "parallel: {tp: 2, dp: 3, ep: 4}\n"))
    msg = str(e.value)
    assert msg.startswith("parallel.ep:"), msg
    assert "[1, 2, 3, 6]" in msg  # the valid choices for world 6


def test_nodes_not_dividing_world_fails_at_load(tmp_path):
    with pytest.raises(ValueError) as e:
        load_config(_write(tmp_path, "parallel: {tp: 4, nodes: 3}\n"))
    assert str(e.value).startswith("parallel.nodes:"), str(e.value)


# ---- Config.replace ---------------------------------------------------------------------


def test_replace_returns_validated_copy():
    base = config_from_dict({"parallel": {"tp": 2}})
    new = base.replace({"parallel.dp": 2, "parallel.ep": 4, "engine.block_size": 8})
    assert (new.parallel.tp, new.parallel.dp, new.parallel.ep, new.engine.block_size) == (2, 2, 4, 8)
    assert base.parallel == ParallelConfig(tp=2)  # the original is unchanged
    assert new.model == base.model and new.serve == base.serve
    assert base.replace(**{"serve.port": 1}).serve.port == 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"parallel.tpp": 2}, "parallel.tpp"),
        ({"paralel.tp": 2}, "paralel.tp"),
        ({"parallel": 2}, "parallel"),
        ({"parallel.ep": 3}, "parallel.ep"),  # world 1: ep must divide it
        ({"parallel.tp": "2"}, "parallel.tp"),
    ],
)
def test_replace_rejects_bad_overrides(overrides, field):
    with pytest.raises(ValueError) as e:
        Config().replace(overrides)
    assert str(e.value).startswith(f"{field}:"), str(e.value)


# ---- configs/README.md documents every field, with its default ----------------------------


def _readme_rows(section: str) -> dict[str, list[str]]:
    text = (REPO / "configs" / "README.md").read_text()
    start = text.index(f"## `{section}`")
    end = text.find("\n## ", start + 1)
    rows = {}
    for line in text[start : end if end > 0 else None].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is no cell edge
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def _yaml_text(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_readme_documents_every_field_with_its_default(section):
    rows = _readme_rows(section)
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert set(rows) == set(fields), f"configs/README.md, section {section}"
    defaults = SECTIONS[section]()
    for name, cells in rows.items():
        assert cells[2].strip("`") == _yaml_text(getattr(defaults, name)), f"{section}.{name} default"
