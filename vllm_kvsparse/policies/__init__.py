"""KV-sparsity methods as policies (torch only, no vLLM import anywhere in this package).

``POLICIES`` maps each method name to its class; ``make_policy(name, options)`` builds one from
a dict of parameters (unknown keys and bad values raise ``PolicyError`` with a one-line message
naming the method). The contract (PromptInfo, LayerInput, Choice, Policy) is in ``base.py``;
each method is one file citing its paper and official code; docs/policies.md has the table.
Adding a method = one file + one entry below + one row in tests/unit/test_policies.py.
"""

from __future__ import annotations

from .aircache import AirCache
from .base import (Choice, HeadShards, LayerInput, Policy, PolicyError, PromptInfo, StepState,
                   select_all_layers)
from .fastv import FastV
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .vlcache import VLCache
from .zipvl import ZipVL

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (ZipVL, FastV, SnapKV, PyramidKV, StreamingLLM, VLCache, AirCache, Random)
}
METHOD_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, options: dict | None = None) -> Policy:
    """The policy ``name`` with ``options`` (a dict of its parameters; None = defaults)."""
    if name not in POLICIES:
        raise PolicyError(f"unknown KV-sparsity method {name!r}; valid methods are "
                          f"{', '.join(METHOD_NAMES)}")
    return POLICIES[name].from_options(options)


__all__ = ["POLICIES", "METHOD_NAMES", "make_policy", "Policy", "PolicyError", "PromptInfo",
           "LayerInput", "HeadShards", "Choice", "StepState", "select_all_layers", "ZipVL", "FastV", "SnapKV",
           "PyramidKV", "StreamingLLM", "VLCache", "AirCache", "Random"]
