import pytest

from hf_cage import QuantConfig


def test_defaults_follow_the_paper():
    config = QuantConfig()
    assert (config.w_bits, config.a_bits, config.quantizer, config.hadamard) == (4, 4, "quest", True)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "lm_head" in config.skip_modules and "embed_tokens" in config.skip_modules


def test_int_quantizer_has_no_rotation_by_default_and_group_defaults_to_128():
    config = QuantConfig(quantizer="int", granularity="group")
    assert config.hadamard is False and config.group_size == 128


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"w_bits": 5}, "w_bits"),
        ({"a_bits": 6}, "a_bits"),
        ({"quantizer": "nf4"}, "quantizer"),
        ({"granularity": "tensor"}, "granularity"),
        ({"granularity": "group", "group_size": 48}, "group_size"),
        ({"group_size": 32}, "group_size"),
        ({"clip": "percentile"}, "clip"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        QuantConfig(**kwargs)
    if field not in ("group_size",) or "granularity" not in kwargs:
        return
    assert "32" in str(err.value) and "128" in str(err.value)


def test_group_size_must_divide_in_features():
    config = QuantConfig(granularity="group", group_size=128)
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=192"):
        config.weight_spec(192)


def test_dict_round_trip_and_unknown_fields():
    config = QuantConfig(w_bits=3, a_bits=None, quantizer="int", granularity="group", group_size=32)
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"w_bits": 4, "bitz": 3})


def test_weight_only_config_has_no_activation_grid():
    assert QuantConfig(a_bits=None).activation_spec(64) is None


def test_activation_rule_defaults_to_what_the_export_format_serves_for_int():
    assert QuantConfig(quantizer="int").a_clip == "minmax"
    assert QuantConfig(quantizer="int").activation_spec(64).scale_rule == "minmax"
    assert QuantConfig(quantizer="int").weight_spec(64).scale_rule == "mse"
    assert QuantConfig().a_clip == "mse"
    config = QuantConfig(quantizer="int", clip="absmax", a_clip="mse")
    assert (config.weight_spec(64).scale_rule, config.activation_spec(64).scale_rule) == ("absmax", "mse")
    with pytest.raises(ValueError, match="a_clip='percentile'.*'minmax'"):
        QuantConfig(a_clip="percentile")


def test_a_config_saved_before_a_clip_keeps_its_activation_rule():
    saved = QuantConfig(quantizer="int", clip="absmax").to_dict()
    del saved["a_clip"]
    assert QuantConfig.from_dict(saved).a_clip == "absmax"
    assert QuantConfig.from_dict(QuantConfig(quantizer="int").to_dict()).a_clip == "minmax"


def test_trainer_config_passes_the_activation_rule(tmp_path):
    from hf_cage import CAGEConfig

    common = dict(output_dir=str(tmp_path), quant_quantizer="int", use_cpu=True, report_to=[])
    assert CAGEConfig(**common).quant_config().a_clip == "minmax"
    args = CAGEConfig(**common, quant_a_clip="absmax")
    assert args.quant_config().activation_spec(64).scale_rule == "absmax"
