"""Every impossible model value is rejected with one message naming the field and the value."""

import glob
import os

import pytest

from lm2_jax import config as cfglib
from tests.conftest import ROOT, shipped_config

SHIPPED = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{ROOT}/configs/*.py") if not p.endswith("__init__.py"))


def _tiny():
    return shipped_config("tiny")


def test_every_shipped_config_is_tested():
    assert {"tiny", "bench", "lm2_1p7b", "vanilla_1p2b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    """Every configs/*.py loads and validates as its docstring's command would use it."""
    config = cfglib.validate(shipped_config(name))
    assert {"model", "train", "data", "mesh"} <= set(config.keys())


BAD = [
    ("n_heads", 5, "model.n_heads"),  # does not divide d_model=128
    ("n_heads", 64, "model.n_heads"),  # with d_model=192 below: odd head dim 3
    ("n_kv_heads", 3, "model.n_kv_heads"),  # does not divide n_heads
    ("d_model", 0, "model.d_model"),
    ("d_model", -8, "model.d_model"),
    ("vocab_size", 0, "model.vocab_size"),
    ("n_layers", 0, "model.n_layers"),
    ("d_ff", 2.5, "model.d_ff"),
    ("norm_eps", 0.0, "model.norm_eps"),
    ("rope_theta", -1.0, "model.rope_theta"),
    ("dtype", "float16x", "model.dtype"),
    ("param_dtype", "int8", "model.param_dtype"),
    ("remat", "sometimes", "model.remat"),
    ("attention", "magic", "model.attention"),
    ("tie_embeddings", "yes", "model.tie_embeddings"),
    ("memory.layers", 3, "model.memory.layers"),  # L_m > depth (2)
    ("memory.layers", -1, "model.memory.layers"),
    ("memory.slots", 0, "model.memory.slots"),
    ("memory.heads", 3, "model.memory.heads"),  # does not divide d_model
    ("memory.heads", 0, "model.memory.heads"),
    ("memory.top_k", 17, "model.memory.top_k"),  # more than the 16 slots
    ("memory.top_k", -2, "model.memory.top_k"),
    ("memory.init", "zeros", "model.memory.init"),
    ("memory.write_candidate", "both", "model.memory.write_candidate"),
    ("memory.segment_len", -4, "model.memory.segment_len"),
    ("memory.carry", "forever", "model.memory.carry"),
    ("memory.bptt_segments", -1, "model.memory.bptt_segments"),
    ("memory.remat_segments", "no", "model.memory.remat_segments"),
    ("memory.unroll_segments", -1, "model.memory.unroll_segments"),
    ("memory.placement", "before_mlp", "model.memory.placement"),
    ("memory.normalize_bank", "yes", "model.memory.normalize_bank"),
    ("memory.routing", "sum", "model.memory.routing"),
    ("memory.write_rule", "hebbian", "model.memory.write_rule"),
    ("memory.address", "location", "model.memory.address"),
    ("memory.read_scope", "layer", "model.memory.read_scope"),
    ("rope_scaling.type", "yarn", "model.rope_scaling.type"),
]


@pytest.mark.parametrize("field,value,named", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_names_field(field, value, named):
    # Built from a plain dict, as a config file may: ConfigDict's own type checks do not apply.
    tree = _tiny().to_dict()
    section = tree["model"]
    *parents, leaf = field.split(".")
    for p in parents:
        section = section[p]
    if field == "n_heads" and value == 64:
        tree["model"]["d_model"] = 192  # head dim 3: odd, RoPE cannot rotate pairs
        tree["model"]["n_kv_heads"] = 64
    section[leaf] = value
    config = cfglib.ml_collections.ConfigDict(tree)
    with pytest.raises(cfglib.ConfigError) as err:
        cfglib.validate(config)
    assert err.value.field == named, str(err.value)
    assert named in str(err.value) and repr(value) in str(err.value)


def test_llama3_scaling_fields_checked():
    config = _tiny()
    config.model.rope_scaling.type = "llama3"
    config.model.rope_scaling.high_freq_factor = 0.5  # must exceed low_freq_factor=1
    with pytest.raises(cfglib.ConfigError, match=r"model\.rope_scaling\.high_freq_factor=0\.5"):
        cfglib.validate(config)
    config.model.rope_scaling.high_freq_factor = 4.0
    config.model.rope_scaling.factor = 0.5
    with pytest.raises(cfglib.ConfigError, match=r"model\.rope_scaling\.factor=0\.5"):
        cfglib.validate(config)


def test_missing_model_section():
    with pytest.raises(cfglib.ConfigError, match="model"):
        cfglib.validate(cfglib.ml_collections.ConfigDict({}))


def test_train_loss_positions_must_be_non_negative():
    config = _tiny()
    config.train.loss_positions = -1
    with pytest.raises(cfglib.ConfigError, match=r"train\.loss_positions=-1"):
        cfglib.validate(config)


def test_conv_width_must_be_non_negative():
    config = _tiny()
    config.model.conv_width = -2
    with pytest.raises(cfglib.ConfigError, match=r"model\.conv_width=-2"):
        cfglib.validate(config)


def test_delta_write_needs_the_token_candidate():
    config = _tiny()
    config.model.memory.update(dict(layers=1, write_rule="delta", write_candidate="memory"))
    with pytest.raises(cfglib.ConfigError, match=r"model\.memory\.write_candidate='memory'"):
        cfglib.validate(config)


@pytest.mark.parametrize("change,named", [
    (dict(write_rule="gated", write_candidate="tokens"), r"model\.memory\.read_scope='token'.*write_rule='delta'"),
    (dict(address="content"), r"model\.memory\.read_scope='token'.*address='slots'"),
    (dict(layers=2), r"model\.memory\.layers=2.*one memory block"),
])
def test_token_read_scope_needs_the_delta_write_slot_keys_and_one_memory_block(change, named):
    config = _tiny()
    config.model.memory.update(dict(dict(layers=1, write_rule="delta", write_candidate="tokens", address="slots",
                                         read_scope="token"), **change))
    with pytest.raises(cfglib.ConfigError, match=named):
        cfglib.validate(config)


def test_describe_model_names_what_was_trained():
    m = _tiny().model
    m.n_layers, m.memory.layers, m.memory.slots, m.memory.segment_len, m.conv_width = 2, 1, 16, 40, 0
    m.memory.write_rule, m.memory.address, m.memory.read_scope = "gated", "content", "segment"
    assert cfglib.describe_model(m) == "LM2, memory in 1 of 2 blocks, 16 slots, segments of 40"
    m.memory.write_rule = "delta"
    assert cfglib.describe_model(m) == "LM2, memory in 1 of 2 blocks, 16 slots (delta-rule write), segments of 40"
    m.memory.address, m.memory.read_scope = "slots", "token"
    assert cfglib.describe_model(m) == ("LM2, memory in 1 of 2 blocks, 16 slots (delta-rule write, learned slot keys, "
                                        "read token by token), segments of 40")
    m.memory.layers = 0
    assert cfglib.describe_model(m) == "vanilla Llama (no memory), 2 blocks, segments of 40"
    m.memory.segment_len = 0
    assert cfglib.describe_model(m) == "vanilla Llama (no memory), 2 blocks, one segment (full attention)"
    m.conv_width = 6
    assert cfglib.describe_model(m) == ("vanilla Llama (no memory), 2 blocks, one segment (full attention), "
                                        "6-token convolution")


def test_a_workdir_from_before_a_field_existed_reads_with_its_default(tmp_path):
    import json

    from lm2_jax.errors import CheckpointError
    from lm2_jax.train import checkpoint

    tree = json.loads(cfglib.defaults().to_json())
    tree["data"].pop("extra_questions")  # written by a version without the field
    tree["model"]["d_model"] = 96
    (tmp_path / "config.json").write_text(json.dumps(tree))
    config = checkpoint.read_config(str(tmp_path))
    assert config.data.extra_questions == 0.0 and config.model.d_model == 96
    tree["data"]["qa_layout"] = "story"  # a field this version does not know is still named
    (tmp_path / "config.json").write_text(json.dumps(tree))
    with pytest.raises(CheckpointError, match="data.qa_layout='story': unknown field"):
        checkpoint.read_config(str(tmp_path))
