"""Fuzzing the readers of untrusted text: the config parser and the checkpoint-JSON reader.

Property: any input gives a value or the project's own one-line error (:class:`ConfigError`,
:class:`CheckpointError`), never another exception.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difflab.checkpoint import FORMAT, CheckpointError, read_record, read_verified
from difflab.config import SECTIONS, ConfigError, RunConfig, all_keys, apply_overrides, load_config, parse_value

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
keys = st.sampled_from(all_keys() + ["train.lrr", "data.options.noise", "model", "x.y", ""])


def config_like():
    """Nested dicts shaped like a config: real sections and keys, arbitrary values."""
    section = st.sampled_from(list(SECTIONS) + ["bogus"])
    fields = st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in all_keys()] + ["zzz"]), json_values,
                             max_size=5)
    return st.dictionaries(section, st.one_of(fields, json_values), max_size=4)


@FUZZ
@given(raw=st.one_of(config_like(), json_values))
def test_config_from_dict_gives_a_config_or_config_error(raw):
    try:
        cfg = RunConfig.from_dict(raw)
    except ConfigError:
        return
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(text=st.text(max_size=200))
def test_config_file_text_gives_a_config_or_config_error(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(raw=config_like())
def test_yaml_round_trip_of_config_like_documents(tmp_path, raw):
    path = tmp_path / "cfg.yaml"
    try:
        path.write_text(yaml.safe_dump(raw))
    except yaml.YAMLError:
        return
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(items=st.lists(st.tuples(keys, st.text(max_size=20)), max_size=4))
def test_overrides_give_a_value_or_config_error(items):
    try:
        raw = apply_overrides({}, [f"{k}={v}" for k, v in items])
        RunConfig.from_dict(raw)
    except ConfigError:
        pass


@FUZZ
@given(text=st.text(max_size=40))
def test_parse_value_gives_a_value_or_config_error(text):
    try:
        parse_value(text)
    except ConfigError:
        pass


# --- the checkpoint-JSON reader ------------------------------------------------------------------------------
def _valid_record(weights: bytes) -> dict:
    return {"format": FORMAT, "version": 1, "step": 3, "weights": "step_00000003.safetensors",
            "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights), "config": RunConfig().to_dict(),
            "meta": {"data_shape": [2], "num_classes": 0}, "index": {"model": {}}}


EMPTY_SAFETENSORS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"


@pytest.fixture
def record_dir(tmp_path) -> Path:
    (tmp_path / "step_00000003.safetensors").write_bytes(EMPTY_SAFETENSORS)
    return tmp_path


def test_the_valid_record_reads(record_dir):
    js = record_dir / "step_00000003.json"
    js.write_text(json.dumps(_valid_record(EMPTY_SAFETENSORS)))
    record, tensors = read_verified(js, FORMAT, "checkpoint")
    assert record["step"] == 3 and tensors == {}


@FUZZ
@given(field=st.sampled_from(["format", "version", "step", "weights", "sha256", "bytes", "config", "meta", "index"]),
       value=json_values)
def test_record_with_any_field_replaced_gives_a_record_or_checkpoint_error(record_dir, field, value):
    js = record_dir / "step_00000003.json"
    record = _valid_record(EMPTY_SAFETENSORS)
    record[field] = value
    js.write_text(json.dumps(record))
    try:
        read_verified(js, FORMAT, "checkpoint")
    except CheckpointError:
        pass


@FUZZ
@given(data=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=300)))
def test_any_json_document_or_bytes_give_a_record_or_checkpoint_error(record_dir, data):
    js = record_dir / "step_00000003.json"
    js.write_bytes(data)
    try:
        read_record(js, FORMAT, "checkpoint")
    except CheckpointError:
        pass


@FUZZ
@given(header=json_values, tail=st.binary(max_size=64))
def test_any_safetensors_header_gives_tensors_or_checkpoint_error(record_dir, header, tail):
    h = json.dumps(header).encode()
    weights = len(h).to_bytes(8, "little") + h + tail
    (record_dir / "step_00000003.safetensors").write_bytes(weights)
    js = record_dir / "step_00000003.json"
    js.write_text(json.dumps(_valid_record(weights)))
    try:
        read_verified(js, FORMAT, "checkpoint")
    except CheckpointError:
        pass
