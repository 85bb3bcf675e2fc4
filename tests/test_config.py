from pathlib import Path

import pytest

from splitserve.cli import main
from splitserve.config import ConfigError, load_config, parse_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.prefill.replicas >= 1 and cfg.decode.replicas >= 1


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"prefill": {"replicas": 0}}, "prefill.replicas: Input should be greater than or equal to 1"),
        ({"decode": {"max_batch_size": "many"}}, "decode.max_batch_size: Input should be a valid integer"),
        ({"kv_transfer": {"backend": "carrier-pigeon"}}, "kv_transfer.backend: Input should be 'auto'"),
        ({"router": {"polcy": "jsq"}}, "router.polcy: Extra inputs are not permitted"),
        ({"modle": {}}, "modle: Extra inputs are not permitted"),
        ({"server": {"grpc_port": 70000}}, "server.grpc_port: Input should be less than or equal to 65535"),
        ({"decode": {"gpu_memory_fraction": 1.5}}, "decode.gpu_memory_fraction"),
    ],
)
def test_bad_values_name_the_yaml_path(data, expected):
    assert expected in _error(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"router": {"policy": "mixed"}}, "router.policy: the policy 'mixed' is now called 'borrow_idle'"),
        ({"mixed": {"replicas": 1}}, "mixed: the pool is now called hybrid (fix: rename the key 'mixed:'"),
    ],
)
def test_a_renamed_value_is_refused_with_its_new_name(data, expected):
    assert expected in _error(data)


def test_the_renamed_values_are_accepted():
    config = parse_config({"router": {"policy": "borrow_idle"}, "hybrid": {"replicas": 1}})
    assert (config.router.policy.value, config.hybrid.replicas) == ("borrow_idle", 1)


def test_unknown_key_lists_the_valid_ones():
    message = _error({"router": {"polcy": "jsq"}})
    assert "policy" in message and "fix:" in message


def test_more_gpus_than_the_cluster_has():
    message = _error(
        {"cluster": {"device": "cuda", "total_gpus": 3}, "prefill": {"replicas": 2}, "decode": {"replicas": 2}}
    )
    assert message.splitlines()[-1].startswith("cluster.total_gpus: the pools need 4 GPUs")


def test_colocated_mode_does_not_count_the_prefill_pool():
    cfg = parse_config(
        {
            "mode": "colocated",
            "cluster": {"device": "cuda", "total_gpus": 2},
            "prefill": {"replicas": 4},
            "decode": {"replicas": 2},
        }
    )
    assert cfg.gpus_needed == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)


def test_cli_validate_and_show(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("prefill:\n  replicas: 2\n")
    assert main(["config", "validate", str(good)]) == 0
    assert main(["config", "show", str(good)]) == 0
    shown = capsys.readouterr().out
    assert "replicas: 2" in shown and "tpot_ms: 50.0" in shown  # defaults are filled in
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  replicas: -1\n")
    assert main(["config", "validate", str(bad)]) == 1
    assert "decode.replicas" in capsys.readouterr().err


def test_cli_profile_names_what_it_needs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["profile"])
    assert exit_.value.code == 2
    assert "required: config, --out" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  replicas: -1\n")
    assert main(["profile", str(bad), "--out", str(tmp_path / "p.yaml")]) == 2  # before any model loads
    assert "decode.replicas" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_config_reference_is_current():
    from splitserve.config_docs import render

    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == render(), "docs/config.md is stale: python -m splitserve.config_docs > docs/config.md"
