"""What the plugin's two vLLM platforms share: the `--kv-sparsity` flags and the start-up checks
and settings of the sparse path. The platforms themselves: vLLM's CPU platform plus this
(platform_cpu.py) and vLLM's CUDA platform plus this (platform_cuda.py); each in its own module
so that a process imports only its own device's vLLM platform.

vLLM 0.32 has no entry point for new CLI flags. Its documented hook for out-of-tree platforms,
`Platform.pre_register_and_update(parser)`, receives the `vllm serve` parser before parsing, and
`Platform.check_and_update_config(vllm_config)` runs while the config is built in every process.
We use both; nothing of vLLM is patched.

Flow of a setting:
  argparse action (API server) -> _CLI (module global, because from_cli_args keeps only
  EngineArgs fields) -> check_and_update_config -> vllm_config.additional_config (pickled to
  engine core and workers) -> SparsityConfig.from_additional_config wherever it is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vllm_kvsparse.config import (CONFIG_KEY, METHOD_KEY, METHODS, SparsityConfig,
                                  SparsityConfigError, parse_config_json)

logger = logging.getLogger("vllm.kvsparse")

SCHEDULER_CLS = "vllm_kvsparse.scheduler.KVSparseScheduler"
# KV-cache dtypes that store K/V unchanged (attention/cache_read.py reads them back)
PLAIN_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")

# Values given on the command line, remembered by the argparse actions (API-server process).
_CLI: dict[str, object] = {}
# True once our flags were added to a parser: errors then exit with one line, no traceback.
_FROM_CLI = False


class _Remember(argparse.Action):
    """Store the parsed value and remember it for check_and_update_config."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _CLI[self.dest] = values


def _config_json(text: str) -> dict:
    """argparse type for --kv-sparsity-config: a JSON object. Its keys and values depend on the
    method and are checked in check_and_update_config (one line, exit 1)."""
    try:
        return parse_config_json(text)
    except SparsityConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("kv-sparsity-config: ")) from None


def add_cli_args(parser) -> None:
    """Add the plugin's flags to a `vllm serve` parser (idempotent: the hook runs 3-4 times)."""
    global _FROM_CLI
    if parser is None or "--kv-sparsity" in parser._option_string_actions:
        return
    _FROM_CLI = True
    group = parser.add_argument_group(
        "vllm-kvsparse", "Token-sparse prefill and KV eviction (vllm-kvsparse plugin).")
    group.add_argument(
        "--kv-sparsity", choices=METHODS, default=None, action=_Remember,
        help="KV sparsity method. 'none' (default) is stock vLLM. zipvl and fastv prefill "
             "token-sparse; snapkv, pyramidkv, streamingllm, vlcache, aircache and random "
             "prefill dense and evict. Every method frees the dropped tokens' KV blocks. "
             "See docs/policies.md.")
    group.add_argument(
        "--kv-sparsity-config", type=_config_json, default=None, action=_Remember,
        metavar="JSON",
        help="The method's parameters and the plugin's settings as one JSON object, e.g. "
             '\'{"tau": 0.975}\' (zipvl) or \'{"budget": 0.2, "window": 32}\' (snapkv), plus '
             '"exempt_layers", "min_prompt_len", "evict". See docs/policies.md.')


def resolve_config(vllm_config) -> SparsityConfig:
    """CLI values (if any) over additional_config, validated against the model."""
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    method = _CLI.get("kv_sparsity") or ac.get(METHOD_KEY)
    options = dict(ac.get(CONFIG_KEY) or {})
    options.update(_CLI.get("kv_sparsity_config") or {})
    cfg = SparsityConfig.from_options(method, options)
    if cfg.enabled:
        cfg = cfg.for_model(vllm_config.model_config.get_num_layers(vllm_config.parallel_config))
    return cfg


def check_supported(vllm_config, cfg: SparsityConfig, worker_cls: str) -> None:
    """Refuse, at start-up, settings the sparse path cannot serve correctly."""
    if not cfg.enabled:
        return
    pc = vllm_config.parallel_config
    problems = []
    if pc.pipeline_parallel_size > 1:
        # Each stage would evict its own layers, but vLLM 0.32 hands the scheduler only the
        # last stage's model-runner output: the other stages' eviction reports would be lost.
        problems.append(
            f"--pipeline-parallel-size={pc.pipeline_parallel_size} (only 1 is supported: vLLM "
            "0.32 returns only the last pipeline stage's output to the scheduler, so the other "
            "stages' evicted blocks could not be freed; use --tensor-parallel-size)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (not supported)")
    if vllm_config.model_config.use_mla:
        problems.append("an MLA model (only standard multi-head/GQA attention is supported)")
    sched, max_len = vllm_config.scheduler_config, vllm_config.model_config.max_model_len
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in PLAIN_CACHE_DTYPES and sched.enable_chunked_prefill:
        # With chunking on, vLLM may split any prompt (a step's budget is shared with decodes
        # and other prefills), and the completing chunk's selection reads the earlier chunks'
        # K/V back from the cache, which a quantized cache does not hold.
        problems.append(
            f"--kv-cache-dtype={cache_dtype} with chunked prefill (a quantized cache does not "
            "hold the plain K/V of earlier prompt chunks that selection reads; use "
            f"--kv-cache-dtype auto, or --no-enable-chunked-prefill --max-num-batched-tokens "
            f"{max_len})")
    if vllm_config.model_config.get_sliding_window() is not None:
        problems.append("a sliding-window model (its cache drops old blocks that selection "
                        "and compaction would read)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("a KV connector (not supported)")
    if pc.worker_cls not in ("auto", worker_cls):
        problems.append(f"--worker-cls={pc.worker_cls} (the plugin needs its own worker)")
    sched_cls = vllm_config.scheduler_config.scheduler_cls
    if cfg.evicts and sched_cls not in (None, SCHEDULER_CLS) and not (
            isinstance(sched_cls, type) and sched_cls.__name__ == "KVSparseScheduler"):
        problems.append(f"--scheduler-cls={sched_cls} (eviction needs the plugin's scheduler)")
    if cfg.evicts and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        problems.append("--disable-hybrid-kv-cache-manager (eviction needs one KV-cache group "
                        "per layer)")
    if problems:
        raise SparsityConfigError(
            f"kv-sparsity={cfg.method} cannot run with " + "; ".join(problems))


def apply(vllm_config, cfg: SparsityConfig, worker_cls: str) -> list[str]:
    """Make vLLM's settings safe for sparse prefill and log what changed."""
    vllm_config.additional_config.update(cfg.to_additional_config())
    if not cfg.enabled:
        return []
    from vllm_kvsparse import metrics
    metrics.ensure_stats_dir(cfg.method)  # before vLLM spawns the engine core and workers
    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    changed = []
    # Chunked prefill and max_num_batched_tokens stay as the user or vLLM set them: a long
    # prompt is prefilled chunk by chunk and selected at the step that completes it
    # (attention/common.py). Prefix caching stays on with eviction: the plugin's scheduler
    # keeps prompts the method may compact out of the prefix cache (scheduler.py). Without
    # eviction there is no plugin scheduler, and a sparse prefill (zipvl, fastv) leaves K/V
    # that differ from a dense prefill's in every prompt block: nothing may hit them.
    if cache.enable_prefix_caching and not cfg.evicts:
        cache.enable_prefix_caching = False
        changed.append("prefix caching off (evict=false: sparse-prefilled blocks must not be "
                       "shared)")
    if vllm_config.parallel_config.worker_cls == "auto":
        vllm_config.parallel_config.worker_cls = worker_cls
    if cfg.evicts and sched.scheduler_cls is None:
        sched.scheduler_cls = SCHEDULER_CLS
    # The builder reads request ids and prompt lengths from the V1 model runner's input batch.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return changed


def log_settings(cfg: SparsityConfig, changed: list[str]) -> None:
    if not cfg.enabled:
        return
    if changed:
        logger.info("vllm-kvsparse: %s; adjusted vLLM settings: %s",
                    cfg.summary(), ", ".join(changed))
    else:
        logger.info("vllm-kvsparse: %s", cfg.summary())


class KVSparsePlatformMixin:
    """The hooks both platforms share; placed before vLLM's platform class in the MRO.

    Subclasses set `kvsparse_worker_cls` (the worker when a method is on), may set
    `none_worker_cls` (the worker with `--kv-sparsity none` unless `--worker-cls` is given; ""
    keeps vLLM's) and may extend `_check_platform` and `_adjust` (the latter runs after vLLM's
    own `check_and_update_config`)."""

    kvsparse_worker_cls: str = ""
    none_worker_cls: str = ""

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        add_cli_args(parser)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        if not isinstance(vllm_config.additional_config, dict):
            vllm_config.additional_config = {}
        try:
            cfg = resolve_config(vllm_config)
            check_supported(vllm_config, cfg, cls.kvsparse_worker_cls)
            cls._check_platform(vllm_config, cfg)
        except SparsityConfigError as e:
            if _FROM_CLI:  # started from the command line: one line, no traceback, non-zero exit
                sys.exit(f"vllm serve: error: {e}")
            raise
        changed = apply(vllm_config, cfg, cls.kvsparse_worker_cls)
        if not cfg.enabled and cls.none_worker_cls \
                and vllm_config.parallel_config.worker_cls == "auto":
            # vLLM's worker plus workarounds of vLLM bugs only (platform_cpu.py says which).
            vllm_config.parallel_config.worker_cls = cls.none_worker_cls
        block_size_was_set = vllm_config.cache_config.user_specified_block_size
        super().check_and_update_config(vllm_config)
        if cfg.enabled:
            cls._adjust(vllm_config, cfg, changed, block_size_was_set)
        log_settings(cfg, changed)

    @classmethod
    def _check_platform(cls, vllm_config, cfg: SparsityConfig) -> None:
        """Platform-specific refusals (raise SparsityConfigError)."""

    @classmethod
    def _adjust(cls, vllm_config, cfg: SparsityConfig, changed: list[str],
                block_size_was_set: bool) -> None:
        """Platform-specific settings, after vLLM's platform hook; append what changed."""

    @classmethod
    def register_custom_kv_cache_specs(cls, vllm_config) -> None:
        super().register_custom_kv_cache_specs(vllm_config)
        from vllm_kvsparse.kv import register_specs
        register_specs()
