"""SparsityConfig: parsing, validation (every bad value), and the additional_config round trip."""

import pytest

from vllm_kvsparse.config import GLUE_KEYS, METHODS, SparsityConfig, SparsityConfigError
from vllm_kvsparse.policies import METHOD_NAMES, POLICIES


def test_defaults_are_stock_vllm():
    cfg = SparsityConfig()
    assert cfg.method == "none" and not cfg.enabled and cfg.policy is None
    assert METHODS == ("none", *METHOD_NAMES)


def test_zipvl_defaults_are_the_papers():
    policy = SparsityConfig.from_options("zipvl").policy
    assert (policy.tau, policy.num_recent_probes, policy.num_random_probes) == (0.975, 64, 64)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_round_trip_through_additional_config(method):
    options = {"exempt_layers": [0, 3, 0], "min_prompt_len": 7}
    if method == "zipvl":
        options.update(tau=0.9, scope="visual")
    elif method != "fastv":
        options["budget"] = 0.3
    cfg = SparsityConfig.from_options(method, options).for_model(4)
    assert cfg.exempt_layers == (0, 3)
    back = SparsityConfig.from_additional_config(cfg.to_additional_config())
    assert back == cfg and back.num_layers == 4 and back.policy == cfg.policy
    assert back.layer_is_sparse(2) and not back.layer_is_sparse(0)
    assert type(back.policy) is POLICIES[method]
    # every parameter in force is written out, defaults included
    assert set(cfg.to_additional_config()["kv_sparsity_config"]) == \
        set(POLICIES[method].option_keys()) | set(GLUE_KEYS)


def test_empty_additional_config_is_none():
    assert SparsityConfig.from_additional_config({}).method == "none"
    assert SparsityConfig.from_additional_config(None).method == "none"


@pytest.mark.parametrize("method, options, needle", [
    ("bogus", {}, "'bogus' is invalid; valid values are none, zipvl, fastv, snapkv, pyramidkv, "
                  "streamingllm, vlcache, aircache, random"),
    ("zipvl", {"tau": 0.0}, "zipvl: tau=0.0 is invalid; valid values are numbers in (0, 1]"),
    ("zipvl", {"tau": 1.5}, "zipvl: tau=1.5 is invalid"),
    ("zipvl", {"tau": "high"}, "tau='high' is invalid"),
    ("zipvl", {"tau": True}, "tau=True is invalid"),
    ("zipvl", {"num_recent_probes": -1}, "num_recent_probes=-1 is invalid; valid values are "
                                         "integers >= 0"),
    ("zipvl", {"num_random_probes": 2.5}, "num_random_probes=2.5 is invalid"),
    ("zipvl", {"num_recent_probes": 0, "num_random_probes": 0}, "sum >= 1"),
    ("zipvl", {"keep_first": -1}, "keep_first=-1 is invalid"),
    ("zipvl", {"scope": "text"}, "scope='text' is invalid; valid values are 'all', 'visual'"),
    ("zipvl", {"budget": 0.2}, "zipvl: budget is not a zipvl parameter (its budget is adaptive"),
    ("zipvl", {"min_prompt_len": -3}, "min_prompt_len=-3 is invalid"),
    ("zipvl", {"exempt_layers": [-1]}, "exempt layer -1 is invalid"),
    ("zipvl", {"exempt_layers": "0,1"}, "exempt_layers='0,1' is invalid"),
    ("zipvl", {"evict": "yes"}, "evict='yes' is invalid; valid values are true, false"),
    ("zipvl", {"record_tensors": True}, "record_tensors=true needs record_dir"),
    ("zipvl", {"tua": 0.9}, "unknown key 'tua' for zipvl; valid keys are tau, "),
    ("snapkv", {"tau": 0.9}, "unknown key 'tau' for snapkv; valid keys are budget, "),
    ("snapkv", {"budget": 0}, "snapkv: budget=0 is invalid; valid values are numbers in (0, 1]"),
    ("snapkv", {"budget": 1.2}, "snapkv: budget=1.2 is invalid"),
    ("snapkv", {"window": 0}, "snapkv: window=0 is invalid"),
    ("snapkv", {"pooling": "median"}, "snapkv: pooling='median' is invalid"),
    ("pyramidkv", {"beta": 0}, "pyramidkv: beta=0 is invalid"),
    ("streamingllm", {"sinks": -1}, "streamingllm: sinks=-1 is invalid"),
    ("vlcache", {"window_fraction": 2}, "vlcache: window_fraction=2 is invalid"),
    ("aircache", {"alpha": 0}, "aircache: alpha=0 is invalid"),
    ("fastv", {"k": 0}, "fastv: k=0 is invalid"),
    ("random", {"seed": "x"}, "random: seed='x' is invalid"),
    ("snapkv", {"evict": False}, "evict=false is invalid for snapkv"),
    ("none", {"tau": 0.9}, "'tau' is a method parameter but kv-sparsity is none"),
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


def test_fastv_scoring_layer_cannot_be_exempt():
    cfg = SparsityConfig.from_options("fastv", {"k": 2, "exempt_layers": [1]})
    with pytest.raises(SparsityConfigError, match="exempt layer 1 is invalid for fastv"):
        cfg.for_model(4)
    SparsityConfig.from_options("fastv", {"k": 2, "exempt_layers": [0]}).for_model(4)
