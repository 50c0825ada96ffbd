import json

import pytest

from builder.config import ConfigError, load_config, parse_config
from builder.presets import FLASH, PRO, preset_json
from builder.sizes import model_sizes


def test_flash_and_pro_configs_parse():
    flash, pro = parse_config(FLASH), parse_config(PRO)
    assert (flash.hidden_size, flash.num_hidden_layers, flash.n_routed_experts) == (4096, 43, 256)
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts) == (7168, 61, 384)
    assert flash.rope_factor == 16 and flash.rope_original_max_position == 65536
    assert flash.expert_dtype == pro.expert_dtype == "fp4"
    assert flash.ratio(2) == 4 and flash.ratio(3) == 128 and flash.ratio(43) == 0


def test_flash_parameter_counts_match_the_release():
    s = model_sizes(parse_config(FLASH))
    assert s.params_total == pytest.approx(284.3e9, rel=0.005)
    assert s.params_active == pytest.approx(13.27e9, rel=0.005)
    assert s.checkpoint_bytes == pytest.approx(159.6e9, rel=0.005)
    assert s.bytes_per_token == pytest.approx(11.3e9, rel=0.02)


def test_config_round_trips_through_json():
    cfg = parse_config(preset_json("tiny"))
    assert parse_config(cfg.to_json()) == cfg


@pytest.mark.parametrize("field", ["hidden_size", "compress_ratios", "rope_scaling", "quantization_config",
                                   "num_hash_layers"])
def test_missing_field_is_named(field):
    raw = preset_json("flash")
    del raw[field]
    with pytest.raises(ConfigError, match=field):
        parse_config(raw)


@pytest.mark.parametrize("change, field", [
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"hidden_size": 4000}, "hidden_size"),
    ({"o_groups": 7}, "o_groups"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
], ids=["topk>experts", "hidden-not-128", "groups", "ratios-length", "not-int", "scoring", "rope-type"])
def test_inconsistent_sizes_are_rejected(change, field):
    raw = {**preset_json("flash"), **change}
    with pytest.raises(ConfigError, match=field):
        parse_config(raw)


def test_load_config_names_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset_json("tiny")))
    assert load_config(tmp_path).hidden_size == 256
