"""Run configs: YAML loading, dotted overrides, the validation rules and their one-line errors."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from difflab.config import (NETWORK_FIELDS, ConfigError, DiffusionConfig, ModelConfig, RunConfig, all_keys,
                            apply_overrides, build_path, dump_config, load_config, parse_value)
from difflab.paths import DiscretePath, LinearPath, TrigPath, VPPath

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_overrides_use_yaml_values_and_dotted_keys():
    cfg = load_config(None, ["train.lr=1e-3", "train.steps=7", "model.channel_mults=[1, 2]",
                             "data.options.noise=0.05", "diffusion.zero_terminal_snr=true", "diffusion.target=v",
                             "model.attn_resolutions=null"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.channel_mults == [1, 2]
    assert cfg.data.options == {"noise": 0.05}
    assert cfg.diffusion.zero_terminal_snr is True and cfg.model.attn_resolutions is None


def test_overrides_apply_over_a_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\n  lr: 2.0e-4\n")
    cfg = load_config(f, ["train.steps=3"])
    assert (cfg.train.steps, cfg.train.lr) == (3, 2e-4)
    raw = {"train": {"steps": 10}}
    apply_overrides(raw, ["train.steps=3"])
    assert raw == {"train": {"steps": 10}}, "overrides must not modify the caller's dict"


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E+2", 200.0), ("1.5e-4", 1.5e-4), ("3", 3), ("true", True),
                                         ("[1, 2]", [1, 2]), ("null", None), ("cosine", "cosine"), ("-1e2", -100.0)])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_int_is_accepted_for_a_float_but_not_the_reverse():
    assert RunConfig.from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        RunConfig.from_dict({"train": {"steps": 10.0}})


BAD = [
    ({"train": {"lrr": 1e-3}}, "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"trian": {}}, "unknown config section 'trian' (did you mean 'train'?)"),
    ({"train": {"steps": "many"}}, "train.steps must be an integer"),
    ({"train": {"steps": 0}}, "train.steps must be >= 1"),
    ({"train": {"steps": -5}}, "train.steps must be >= 1"),
    ({"train": {"lr": -1.0}}, "train.lr must be a positive number"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be >= 1"),
    ({"train": {"p_uncond": 1.0}, "model": {"conditional": True}}, "train.p_uncond must lie in [0, 1)"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay must lie in [0, 1)"),
    ({"train": {"p_uncond": 0.1}}, "needs model.conditional: true"),
    ({"train": {"mixed_precision": "fp16"}}, "train.mixed_precision must be one of auto, bf16, no"),
    ({"model": {"kind": "transformer"}}, "model.kind must be one of mlp, unet"),
    ({"model": {"conditional": "yes"}}, "model.conditional must be true or false"),
    ({"model": {"channel_mults": [1, 0]}}, "model.channel_mults must be a non-empty list of positive integers"),
    ({"diffusion": {"target": "epsilon"}}, "diffusion.target must be one of eps, x0, v, velocity; got 'epsilon' (did you mean 'eps'?)"),
    ({"diffusion": {"schedule": "cosin"}}, "(did you mean 'cosine'?)"),
    ({"diffusion": {"path": "linear", "target": "eps"}}, "singular at t_max on the linear path"),
    ({"diffusion": {"zero_terminal_snr": True}}, "singular at t_max on zero terminal SNR"),
    ({"diffusion": {"target": "velocity"}}, "needs a continuous path"),
    ({"diffusion": {"zero_terminal_snr": True, "target": "v", "weighting": "min_snr"}}, "divides by SNR"),
    ({"data": {"name": "folder"}}, "data set 'folder' reads your files: set data.path"),
    ({"data": {"n": 0}}, "data.n must be >= 1"),
    ({"data": {"options": [1, 2]}}, "data.options must be a mapping"),
    ([1, 2], "a config must be a mapping"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_malformed_configs_give_one_line_errors(raw, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(raw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("item, message", [("train.lr", "expects key=value"), ("train=3", "needs a key inside a section"),
                                           ("train.lr.x=1", "has no sub-keys"), ("optim.lr=1", "unknown config key"),
                                           ("train.lr=[1, 2", "cannot parse value")])
def test_bad_overrides(item, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [item])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML") as info:
        load_config(f)
    assert "\n" not in str(info.value)


def test_build_path():
    d = build_path(DiffusionConfig(schedule="cosine", T=50))
    assert isinstance(d, DiscretePath) and d.T == 50
    z = build_path(DiffusionConfig(T=50, zero_terminal_snr=True, target="v"))
    assert float(z.alpha_bar[-1]) == 0.0
    assert isinstance(build_path(DiffusionConfig(path="linear", target="velocity")), LinearPath)
    assert isinstance(build_path(DiffusionConfig(path="vp")), VPPath)
    assert isinstance(build_path(DiffusionConfig(path="trig", target="v")), TrigPath)


def test_rejected_eps_target_is_really_singular():
    """Why 'eps' is refused where a(t_max) = 0: x̂0 = (x − s ε̂)/a is then a division by zero."""
    for path in (LinearPath(), build_path(DiffusionConfig(T=50, zero_terminal_snr=True, target="v"))):
        assert float(path.a(torch.tensor(path.t_max))) == 0.0


@pytest.mark.parametrize("kind", sorted(NETWORK_FIELDS))
def test_model_fields_match_the_network_signatures(kind):
    """Every network field of ModelConfig is a keyword of the network, with the network's own default."""
    from difflab.networks import NETWORKS, network_options

    assert set(NETWORK_FIELDS[kind]) <= set(network_options(kind))
    signature = inspect.signature(NETWORKS[kind][1].__init__).parameters
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(ModelConfig)}
    for name in NETWORK_FIELDS[kind]:
        net_default = signature[name].default
        net_default = list(net_default) if isinstance(net_default, tuple) else net_default
        assert defaults[name] == net_default, name


def test_all_keys_are_dotted_and_complete():
    keys = all_keys()
    assert "train.lr" in keys and "diffusion.min_snr_gamma" in keys and "model.channel_mults" in keys
    assert all(k.count(".") == 1 for k in keys)


def test_a_schedule_the_path_refuses_is_a_config_error():
    """The linear schedule scales β by 1000/T, so T=10 would need β_T = 2 > 1."""
    with pytest.raises(ConfigError, match="the linear schedule with T=10"):
        RunConfig.from_dict({"diffusion": {"T": 10}})
