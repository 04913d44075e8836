"""SparsityConfig: the one place the plugin's settings are defined, parsed and validated.

Built once (from `vllm serve` flags or from `LLM(additional_config=...)`), stored in
`vllm_config.additional_config` as plain JSON-able values so it travels to every vLLM process
(API server, engine core, workers), and rebuilt there with `SparsityConfig.from_additional_config`.
No vLLM import here (nor in vllm_kvsparse.policies): usable and testable without vLLM.

    vllm serve MODEL --kv-sparsity zipvl --kv-sparsity-config '{"tau": 0.95, "scope": "visual"}'
    vllm serve MODEL --kv-sparsity snapkv --kv-sparsity-config '{"budget": 0.2, "window": 32}'
    LLM(MODEL, additional_config={"kv_sparsity": "zipvl", "kv_sparsity_config": {"tau": 0.95}})

The method's own parameters are validated by its policy (vllm_kvsparse.policies); the glue keys
(GLUE_KEYS) are the same for every method.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_kvsparse.policies import METHOD_NAMES, POLICIES, Policy, PolicyError, make_policy

METHODS = ("none", *METHOD_NAMES)

# Keys under vllm_config.additional_config.
METHOD_KEY = "kv_sparsity"
CONFIG_KEY = "kv_sparsity_config"


class SparsityConfigError(ValueError):
    """A bad plugin setting. The message is one line naming the value and the valid ones."""


@dataclass(frozen=True)
class SparsityConfig:
    """The plugin's settings: the method with its own parameters, plus how vLLM runs it.

    method: "none" (stock vLLM, the default) or a method of vllm_kvsparse.policies
        (zipvl, fastv, snapkv, pyramidkv, streamingllm, vlcache, aircache, random).
    options: the method's own parameters (e.g. zipvl's tau, snapkv's budget and window),
        validated by building the method's policy (`policy`), then stored with every default
        filled in. docs/policies.md lists them.
    exempt_layers: decoder layer indices that always run dense and keep all their K/V.
    min_prompt_len: prompts shorter than this run dense: with few tokens the scoring pass costs
        about as much as it saves.
    evict: after prefill, keep each layer's K/V only for its kept tokens and give the freed
        KV-cache blocks back to vLLM. False: sparse prefill only (methods with a sparse prefill:
        zipvl, fastv); the other methods only save memory, so they need it.
    record_dir: debug only. When set, each worker appends one JSON line per (request, layer)
        with the kept set to `record_dir/kept-<pid>.jsonl`.
    record_tensors: debug only (needs record_dir). Also save each sparse layer's query, key,
        value and output per request as `record_dir/tensors-<req>-layer<i>.pt` (sparse
        prefills; dense prefills: key and value as `prefill-<req>-layer<i>.pt`), and each
        decode step's as `decode-<req>-<layer name>.pt`.
    cpu_sparse_kernel: the CPU backend's sparse-attention kernel: "torch" (fp32 SDPA over the
        kept rows), "vllm" (vLLM's own CPU attention kernel over the kept rows, in the cache
        dtype: attention/cpu_kernel.py) or "auto" (the measured choice for the CPU's ISA).
    """

    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    exempt_layers: tuple[int, ...] = ()
    min_prompt_len: int = 1024
    evict: bool = True
    record_dir: str | None = None
    record_tensors: bool = False
    cpu_sparse_kernel: str = "auto"
    # Not settable from the config JSON: filled in at start-up from the model.
    num_layers: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_choice("kv-sparsity", self.method, METHODS)
        _check_non_negative_int("min_prompt_len", self.min_prompt_len)
        object.__setattr__(self, "exempt_layers", _exempt_layers(self.exempt_layers))
        for name in ("evict", "record_tensors"):
            if not isinstance(getattr(self, name), bool):
                raise SparsityConfigError(
                    f"kv-sparsity-config: {name}={getattr(self, name)!r} is invalid; "
                    "valid values are true, false")
        _check_choice("kv-sparsity-config: cpu_sparse_kernel", self.cpu_sparse_kernel,
                      CPU_SPARSE_KERNELS)
        if self.record_dir is not None and not isinstance(self.record_dir, str):
            raise SparsityConfigError(
                f"kv-sparsity-config: record_dir={self.record_dir!r} is invalid; "
                "valid values are a directory path or null")
        if self.record_tensors and not self.record_dir:
            raise SparsityConfigError(
                "kv-sparsity-config: record_tensors=true needs record_dir (where the tensors "
                "are written); valid values: set record_dir, or record_tensors=false")
        object.__setattr__(self, "_policy", self._build_policy())
        # Every parameter in force (defaults filled in, values normalised by the policy): two
        # configs that run the same are equal, and the round trip through additional_config
        # is exact.
        object.__setattr__(self, "options", self.method_parameters())
        if self._policy is not None and not self._policy.sparse_prefill and not self.evict:
            raise SparsityConfigError(
                f"kv-sparsity-config: evict=false is invalid for {self.method} (its prefill is "
                "dense, so it saves nothing without eviction); valid values are true")

    def _build_policy(self) -> Policy | None:
        options = dict(self.options or {})
        if not self.enabled:
            if options:
                raise SparsityConfigError(
                    f"kv-sparsity-config: {sorted(options)[0]!r} is a method parameter but "
                    f"kv-sparsity is none; valid methods are {', '.join(METHODS[1:])}")
            return None
        keys = POLICIES[self.method].option_keys()
        unknown = sorted(set(options) - set(keys))
        if unknown and not (self.method == "zipvl" and unknown == ["budget"]):
            raise SparsityConfigError(
                f"kv-sparsity-config: unknown key {unknown[0]!r} for {self.method}; valid keys "
                f"are {', '.join(keys + GLUE_KEYS)}")
        try:
            return make_policy(self.method, options)
        except PolicyError as e:
            raise SparsityConfigError(f"kv-sparsity-config: {e}") from None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_options(cls, method: str | None = None,
                     options: dict[str, Any] | str | None = None) -> "SparsityConfig":
        """Build from a method name and one options dict (or its JSON text) holding the
        method's parameters and the glue keys (GLUE_KEYS) side by side."""
        if isinstance(options, str):
            options = parse_config_json(options)
        options = dict(options or {})
        glue = {k: options.pop(k) for k in GLUE_KEYS if k in options}
        if "exempt_layers" in glue and glue["exempt_layers"] is not None:
            glue["exempt_layers"] = tuple(_as_list(glue["exempt_layers"]))
        return cls(method=method or "none", options=options, **glue)

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "SparsityConfig":
        """Rebuild the config a vLLM process received (API server, engine core or worker)."""
        ac = additional_config if isinstance(additional_config, dict) else {}
        cfg = cls.from_options(ac.get(METHOD_KEY), ac.get(CONFIG_KEY))
        if ac.get("kv_sparsity_num_layers") is not None:
            cfg = dataclasses.replace(cfg, num_layers=int(ac["kv_sparsity_num_layers"]))
        return cfg

    def to_additional_config(self) -> dict[str, Any]:
        """The JSON-able form stored in vllm_config.additional_config: every parameter of the
        method with its value in force (defaults filled in), and the glue keys."""
        options = dict(self.options)
        options.update({k: getattr(self, k) for k in GLUE_KEYS})
        options["exempt_layers"] = list(self.exempt_layers)
        out = {METHOD_KEY: self.method, CONFIG_KEY: options}
        if self.num_layers is not None:
            out["kv_sparsity_num_layers"] = self.num_layers
        return out

    def for_model(self, num_layers: int) -> "SparsityConfig":
        """Validate the layer-dependent settings against the model's decoder depth."""
        bad = [i for i in self.exempt_layers if not 0 <= i < num_layers]
        if bad:
            raise SparsityConfigError(
                f"kv-sparsity-config: exempt layer {bad[0]} is out of range; "
                f"valid layer indices are 0..{num_layers - 1}")
        scoring = getattr(self.policy, "scoring_layer", None)
        if scoring is not None and scoring in self.exempt_layers:
            raise SparsityConfigError(
                f"kv-sparsity-config: exempt layer {scoring} is invalid for {self.method} (it "
                f"scores the tokens at layer {scoring}); valid exempt layers exclude it")
        return dataclasses.replace(self, num_layers=num_layers)

    # ---- queries --------------------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        """The method (vllm_kvsparse.policies) with its parameters; None for "none"."""
        return self._policy

    def method_parameters(self) -> dict[str, Any]:
        if self.policy is None:
            return {}
        return {k: getattr(self.policy, k) for k in self.policy.option_keys()}

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def evicts(self) -> bool:
        return self.enabled and self.evict

    def selects(self, num_prompt_tokens: int) -> bool:
        """Whether a prompt of this length is prefilled sparse / compacted (else dense). The
        attention builder and the scheduler's prefix-cache rule both ask this."""
        return self.enabled and num_prompt_tokens >= self.min_prompt_len

    def layer_is_sparse(self, layer_idx: int) -> bool:
        return self.enabled and layer_idx not in self.exempt_layers

    def summary(self) -> str:
        if not self.enabled:
            return "kv-sparsity=none"
        params = " ".join(f"{k}={v}" for k, v in self.method_parameters().items())
        return (f"kv-sparsity={self.method} {params} exempt_layers={list(self.exempt_layers)} "
                f"min_prompt_len={self.min_prompt_len} evict={self.evict}")


# Settings of the glue (how vLLM runs the method), accepted beside every method's parameters.
GLUE_KEYS = ("exempt_layers", "min_prompt_len", "evict", "record_dir", "record_tensors",
             "cpu_sparse_kernel")
CPU_SPARSE_KERNELS = ("auto", "vllm", "torch")


def parse_config_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SparsityConfigError(
            f"kv-sparsity-config: {text!r} is not valid JSON ({e.msg}); "
            'expected an object such as \'{"tau": 0.95}\'') from None
    if not isinstance(value, dict):
        raise SparsityConfigError(
            f"kv-sparsity-config: {text!r} is not a JSON object; "
            'expected an object such as \'{"tau": 0.95}\'')
    return value


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SparsityConfigError(
            f"{name}: {value!r} is invalid; valid values are {', '.join(valid)}")


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SparsityConfigError(
            f"kv-sparsity-config: {name}={value!r} is invalid; valid values are integers >= 0")


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    raise SparsityConfigError(
        f"kv-sparsity-config: exempt_layers={value!r} is invalid; "
        "valid values are a list of layer indices")


def _exempt_layers(value: Any) -> tuple[int, ...]:
    layers = _as_list(value)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise SparsityConfigError(
                f"kv-sparsity-config: exempt layer {i!r} is invalid; "
                "valid values are layer indices >= 0")
    return tuple(sorted(set(layers)))
