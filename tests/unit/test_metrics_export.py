"""The kvsparse_ metrics as Prometheus text, from the per-process stats files: per engine
(data-parallel rank), through the one-process collector and through prometheus_client's
multiprocess mode (several API servers), which must give the same samples."""

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from vllm_kvsparse import metrics

LABELS = {"model_name": "m", "method": "zipvl"}


def write_sink(directory, monkeypatch, role, engine, layers, freed=0.0, pid=0):
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(directory))
    sink = metrics.StatsSink(role, engine)
    for layer, (n, kept) in layers.items():
        sink.observe_layer(layer, n, kept, 0.5, num_heads=4, head_dim=64)
    if freed:
        sink.add("kv_blocks_freed", freed)
    if role == "worker":
        sink.fallback("short_prompt", 2)
    monkeypatch.setattr(metrics.os, "getpid", lambda: pid)
    sink.flush()


def samples(text):
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def stats_dir(tmp_path, monkeypatch):
    d = tmp_path / "stats"
    d.mkdir()
    # engine 0: one worker, one scheduler; engine 1: one worker, one scheduler
    write_sink(d, monkeypatch, "worker", 0, {0: (100, 50), 1: (100, 30)}, pid=1)
    write_sink(d, monkeypatch, "engine", 0, {}, freed=3, pid=2)
    write_sink(d, monkeypatch, "worker", 1, {0: (200, 200)}, pid=3)
    write_sink(d, monkeypatch, "engine", 1, {}, freed=5, pid=4)
    return d


def test_totals_are_per_engine(tmp_path, monkeypatch):
    totals = metrics.read_totals(str(stats_dir(tmp_path, monkeypatch)))
    assert sorted(totals) == [0, 1]
    assert totals[0]["counters"]["prompt_tokens_kept"] == 80
    assert totals[0]["counters"]["kv_blocks_freed"] == 3
    assert totals[1]["counters"]["prompt_tokens_seen"] == 200
    assert totals[1]["counters"]["kv_blocks_freed"] == 5


def test_multiprocess_export_equals_the_collector(tmp_path, monkeypatch):
    directory = stats_dir(tmp_path, monkeypatch)
    registry = CollectorRegistry()
    registry.register(metrics.KVSparseCollector(str(directory), "m", "zipvl"))
    direct = samples(generate_latest(registry).decode())

    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    metrics.MultiprocessExporter(str(directory), str(multiproc), LABELS).write()
    mp_registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(mp_registry, path=str(multiproc))
    exported = samples(generate_latest(mp_registry).decode())
    assert exported == direct

    def get(name, **labels):
        return direct[(name, frozenset({**LABELS, **labels}.items()))]

    assert get("kvsparse_kv_blocks_freed_total", engine="0") == 3
    assert get("kvsparse_kv_blocks_freed_total", engine="1") == 5
    assert get("kvsparse_prompt_tokens_kept_total", engine="1") == 200
    assert get("kvsparse_kept_ratio_bucket", engine="0", layer="1", le="0.3") == 1
    assert get("kvsparse_kept_ratio_bucket", engine="0", layer="1", le="0.25") == 0
    assert get("kvsparse_kept_ratio_count", engine="0", layer="0") == 1
    assert get("kvsparse_dense_fallback_requests_total", engine="1", reason="short_prompt") == 2

    # totals grow: a second write replaces the values (it never adds to them)
    write_sink(directory, monkeypatch, "engine", 1, {}, freed=7, pid=5)
    metrics.MultiprocessExporter(str(directory), str(multiproc), LABELS).write()
    again = samples(generate_latest(mp_registry).decode())
    key = ("kvsparse_kv_blocks_freed_total", frozenset({**LABELS, "engine": "1"}.items()))
    assert again[key] == 12


def test_flops_saved_by_a_chunked_prompt_count_only_its_completing_chunk():
    """Causal attention costs 2*H*d*(n^2) FLOPs (QK^T and PV, half the square): a prompt whose
    first 600 of 1000 positions ran dense in earlier chunks saves only on the rest."""
    from vllm_kvsparse.metrics import StatsSink

    one, chunked = StatsSink("worker"), StatsSink("worker")
    one.observe_layer(0, 1000, 300, 0.0, num_heads=4, head_dim=64)
    chunked.observe_layer(0, 1000, 300, 0.0, num_heads=4, head_dim=64, num_before=600,
                          kept_before=200)
    assert one.counters["attention_flops_saved"] == 2.0 * 4 * 64 * (1000 ** 2 - 300 ** 2)
    assert chunked.counters["attention_flops_saved"] == \
        2.0 * 4 * 64 * ((1000 ** 2 - 600 ** 2) - (300 ** 2 - 200 ** 2))
