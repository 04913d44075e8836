"""SparsityConfig: the one place the plugin's settings are defined, parsed and validated.

Built once (from `vllm serve` flags or from `LLM(additional_config=...)`), stored in
`vllm_config.additional_config` as plain JSON-able values so it travels to every vLLM process
(API server, engine core, workers), and rebuilt there with `SparsityConfig.from_additional_config`.
No vLLM import here: the config is usable (and testable) without vLLM.

    vllm serve MODEL --kv-sparsity zipvl --kv-sparsity-config '{"tau": 0.95, "scope": "visual"}'
    LLM(MODEL, additional_config={"kv_sparsity": "zipvl", "kv_sparsity_config": {"tau": 0.95}})
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("none", "zipvl")
SCOPES = ("all", "visual")

# Keys under vllm_config.additional_config.
METHOD_KEY = "kv_sparsity"
CONFIG_KEY = "kv_sparsity_config"


class SparsityConfigError(ValueError):
    """A bad plugin setting. The message is one line naming the value and the valid ones."""


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of token-sparse prefill (and, later, KV eviction).

    method: "none" (stock vLLM, the default) or "zipvl".
    tau: fraction of the probes' attention mass the kept tokens must hold (ZipVL Eq. 7), (0, 1].
        The paper's default 0.975; accuracy drops sharply below ~0.97.
    num_recent_probes / num_random_probes: probe queries = the last `num_recent_probes` prompt
        positions + `num_random_probes` seeded random positions (ZipVL supplement Table A: 64+64).
    keep_first: attention-sink tokens at the start of the prompt that are never dropped.
    keep_last: most recent prompt tokens that are never dropped (the last prompt token's output
        feeds the first generated token).
    scope: "all" (the paper: any token may be dropped) or "visual" (only image/video placeholder
        tokens may be dropped; text is always kept).
    exempt_layers: decoder layer indices that always run dense (e.g. [0, 1] as in FastV).
    min_prompt_len: prompts shorter than this run dense: with few tokens the probe pass costs
        about as much as the attention it saves.
    seed: seed of the random probe positions (reproducible selections).
    evict: after prefill, keep each layer's K/V only for its kept tokens and give the freed
        KV-cache blocks back to vLLM (the decode-side half of ZipVL). False: prefill only.
    record_dir: debug only. When set, each worker appends one JSON line per (request, layer)
        with the kept set to `record_dir/kept-<pid>.jsonl`.
    record_tensors: debug only (needs record_dir). Also save each sparse layer's query, key,
        value and output per request as `record_dir/tensors-<req>-layer<i>.pt`.
    """

    method: str = "none"
    tau: float = 0.975
    num_recent_probes: int = 64
    num_random_probes: int = 64
    keep_first: int = 4
    keep_last: int = 1
    scope: str = "all"
    exempt_layers: tuple[int, ...] = ()
    min_prompt_len: int = 1024
    seed: int = 0
    evict: bool = True
    record_dir: str | None = None
    record_tensors: bool = False
    # Not settable from the config JSON: filled in at start-up from the model.
    num_layers: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_choice("kv-sparsity", self.method, METHODS)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) \
                or not 0.0 < float(self.tau) <= 1.0:
            raise SparsityConfigError(
                f"kv-sparsity-config: tau={self.tau!r} is invalid; valid range is (0, 1]")
        object.__setattr__(self, "tau", float(self.tau))
        for name in ("num_recent_probes", "num_random_probes", "keep_first", "keep_last",
                     "min_prompt_len"):
            _check_non_negative_int(name, getattr(self, name))
        if self.num_recent_probes + self.num_random_probes == 0:
            raise SparsityConfigError(
                "kv-sparsity-config: num_recent_probes + num_random_probes is 0; "
                "at least one probe query is needed")
        _check_choice("kv-sparsity-config: scope", self.scope, SCOPES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SparsityConfigError(
                f"kv-sparsity-config: seed={self.seed!r} is invalid; valid values are integers")
        object.__setattr__(self, "exempt_layers", _exempt_layers(self.exempt_layers))
        for name in ("evict", "record_tensors"):
            if not isinstance(getattr(self, name), bool):
                raise SparsityConfigError(
                    f"kv-sparsity-config: {name}={getattr(self, name)!r} is invalid; "
                    "valid values are true, false")
        if self.record_dir is not None and not isinstance(self.record_dir, str):
            raise SparsityConfigError(
                f"kv-sparsity-config: record_dir={self.record_dir!r} is invalid; "
                "valid values are a directory path or null")

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_options(cls, method: str | None = None,
                     options: dict[str, Any] | str | None = None) -> "SparsityConfig":
        """Build from a method name and an options dict (or its JSON text)."""
        if isinstance(options, str):
            options = parse_config_json(options)
        options = dict(options or {})
        unknown = sorted(set(options) - set(settable_keys()))
        if unknown:
            raise SparsityConfigError(
                f"kv-sparsity-config: unknown key {unknown[0]!r}; "
                f"valid keys are {', '.join(settable_keys())}")
        if "exempt_layers" in options and options["exempt_layers"] is not None:
            options["exempt_layers"] = tuple(_as_list(options["exempt_layers"]))
        return cls(method=method or "none", **options)

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "SparsityConfig":
        """Rebuild the config a vLLM process received (API server, engine core or worker)."""
        ac = additional_config if isinstance(additional_config, dict) else {}
        cfg = cls.from_options(ac.get(METHOD_KEY), ac.get(CONFIG_KEY))
        if ac.get("kv_sparsity_num_layers") is not None:
            cfg = dataclasses.replace(cfg, num_layers=int(ac["kv_sparsity_num_layers"]))
        return cfg

    def to_additional_config(self) -> dict[str, Any]:
        """The JSON-able form stored in vllm_config.additional_config."""
        options = {k: getattr(self, k) for k in settable_keys()}
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
        return dataclasses.replace(self, num_layers=num_layers)

    # ---- queries --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def evicts(self) -> bool:
        return self.enabled and self.evict

    def layer_is_sparse(self, layer_idx: int) -> bool:
        return self.enabled and layer_idx not in self.exempt_layers

    def summary(self) -> str:
        if not self.enabled:
            return "kv-sparsity=none"
        return (f"kv-sparsity={self.method} tau={self.tau} probes={self.num_recent_probes}+"
                f"{self.num_random_probes} keep_first={self.keep_first} "
                f"keep_last={self.keep_last} scope={self.scope} "
                f"exempt_layers={list(self.exempt_layers)} min_prompt_len={self.min_prompt_len} "
                f"evict={self.evict}")


def settable_keys() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SparsityConfig)
                 if f.name not in ("method", "num_layers"))


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
