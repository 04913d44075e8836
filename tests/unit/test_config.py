"""SparsityConfig: parsing, validation (every bad value), and the additional_config round trip."""

import pytest

from vllm_kvsparse.config import SparsityConfig, SparsityConfigError


def test_defaults_are_stock_vllm():
    cfg = SparsityConfig()
    assert cfg.method == "none" and not cfg.enabled
    assert cfg.tau == 0.975 and cfg.num_recent_probes == 64 and cfg.num_random_probes == 64


def test_round_trip_through_additional_config():
    cfg = SparsityConfig.from_options("zipvl", '{"tau": 0.9, "scope": "visual", '
                                               '"exempt_layers": [1, 0, 1]}').for_model(4)
    assert cfg.exempt_layers == (0, 1)
    back = SparsityConfig.from_additional_config(cfg.to_additional_config())
    assert back == cfg and back.num_layers == 4
    assert back.layer_is_sparse(2) and not back.layer_is_sparse(1)


def test_empty_additional_config_is_none():
    assert SparsityConfig.from_additional_config({}).method == "none"
    assert SparsityConfig.from_additional_config(None).method == "none"


@pytest.mark.parametrize("method, options, needle", [
    ("bogus", {}, "'bogus' is invalid; valid values are none, zipvl"),
    ("zipvl", {"tau": 0.0}, "tau=0.0 is invalid; valid range is (0, 1]"),
    ("zipvl", {"tau": 1.5}, "tau=1.5 is invalid; valid range is (0, 1]"),
    ("zipvl", {"tau": -0.1}, "tau=-0.1 is invalid"),
    ("zipvl", {"tau": "high"}, "tau='high' is invalid"),
    ("zipvl", {"tau": True}, "tau=True is invalid"),
    ("zipvl", {"num_recent_probes": -1}, "num_recent_probes=-1 is invalid; valid values are "
                                         "integers >= 0"),
    ("zipvl", {"num_random_probes": -5}, "num_random_probes=-5 is invalid"),
    ("zipvl", {"num_random_probes": 2.5}, "num_random_probes=2.5 is invalid"),
    ("zipvl", {"num_recent_probes": 0, "num_random_probes": 0}, "at least one probe"),
    ("zipvl", {"keep_first": -1}, "keep_first=-1 is invalid"),
    ("zipvl", {"keep_last": -2}, "keep_last=-2 is invalid"),
    ("zipvl", {"min_prompt_len": -3}, "min_prompt_len=-3 is invalid"),
    ("zipvl", {"scope": "text"}, "'text' is invalid; valid values are all, visual"),
    ("zipvl", {"exempt_layers": [-1]}, "exempt layer -1 is invalid"),
    ("zipvl", {"exempt_layers": "0,1"}, "exempt_layers='0,1' is invalid"),
    ("zipvl", {"seed": "x"}, "seed='x' is invalid"),
    ("zipvl", {"tua": 0.9}, "unknown key 'tua'; valid keys are tau, "),
    ("zipvl", "{not json", "is not valid JSON"),
    ("zipvl", "[1, 2]", "is not a JSON object"),
])
def test_bad_values_give_one_line_naming_value_and_valid_ones(method, options, needle):
    with pytest.raises(SparsityConfigError) as e:
        SparsityConfig.from_options(method, options)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_exempt_layer_out_of_range_for_the_model():
    cfg = SparsityConfig.from_options("zipvl", {"exempt_layers": [0, 2]})
    with pytest.raises(SparsityConfigError, match=r"exempt layer 2 is out of range; "
                                                  r"valid layer indices are 0\.\.1"):
        cfg.for_model(2)
    assert cfg.for_model(3).num_layers == 3
