"""chunked_seed.py's bookkeeping on a stand-in for vLLM 0.32's V1 model runner (the real one,
end to end: tests/e2e/test_chunked_seed.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_kvsparse.chunked_seed import ChunkedSeedFixMixin, take_discarded_generators


def runner(discard, generators, pending=True):
    return SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=len(discard), generators=generators),
        discard_request_mask=SimpleNamespace(np=np.array(discard + [True] * 4)),  # stale tail
        execute_model_state=object() if pending else None)


def gens(*rows):
    return {r: torch.Generator().manual_seed(r) for r in rows}


def test_takes_only_the_generators_of_discarded_rows():
    g = gens(0, 1, 3)
    r = runner([True, False, True, True], dict(g))
    assert take_discarded_generators(r) == {0: g[0], 3: g[3]}
    assert r.input_batch.generators == {1: g[1]}   # row 2 has no generator: not touched


@pytest.mark.parametrize("r", [
    runner([True], gens(0), pending=False),                       # no step to sample
    runner([True], {}),                                           # nobody has a seed
    SimpleNamespace(input_batch=SimpleNamespace(num_reqs=1, generators=gens(0))),  # no mask
    SimpleNamespace(),                                            # not a V1 runner at all
])
def test_does_nothing_outside_a_pending_v1_step(r):
    before = dict(getattr(getattr(r, "input_batch", None), "generators", {}) or {})
    assert take_discarded_generators(r) == {}
    assert (getattr(getattr(r, "input_batch", None), "generators", {}) or {}) == before


class _Vllm:
    """vLLM 0.32's behaviour in miniature: sample from each row's generator, then rewind the
    discarded rows' generators by offset (which raises for CPU generators)."""

    def __init__(self, runner, fail=False):
        self.model_runner, self.fail, self.seen = runner, fail, None

    def sample_tokens(self, grammar_output):
        b, mask = self.model_runner.input_batch, self.model_runner.discard_request_mask.np
        self.seen = dict(b.generators)
        for g in b.generators.values():
            torch.randint(0, 2**31, (1,), generator=g)
        for i in np.nonzero(mask[:b.num_reqs])[0]:
            if (g := b.generators.get(int(i))) is not None:
                g.set_offset(g.get_offset() - 4)
        if self.fail:
            raise ValueError("later failure")
        return "output"


class _Worker(ChunkedSeedFixMixin, _Vllm):
    pass


def test_worker_hides_them_for_the_step_and_puts_them_back_untouched():
    g = gens(0, 1)
    states = {i: x.get_state() for i, x in g.items()}
    w = _Worker(runner([True, False], dict(g)))
    assert w.sample_tokens(None) == "output"              # no "CPU Generator ..." error
    assert w.seen == {1: g[1]}
    assert w.model_runner.input_batch.generators == g
    assert torch.equal(g[0].get_state(), states[0])       # sat the discarded step out
    assert not torch.equal(g[1].get_state(), states[1])   # sampled its kept token


def test_worker_puts_them_back_when_vllm_raises():
    g = gens(0)
    w = _Worker(runner([True], dict(g)), fail=True)
    with pytest.raises(ValueError):
        w.sample_tokens(None)
    assert w.model_runner.input_batch.generators == g


def test_cpu_generators_have_no_offset():
    """The root cause, in torch: a CPU generator has no offset (CUDA's Philox ones do)."""
    with pytest.raises(RuntimeError, match="CPU Generator does not use offset"):
        torch.Generator().get_offset()
