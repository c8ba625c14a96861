"""Every model family against HF transformers and PEFT (tests/family_check.py says what each
check does and why its tolerances are what they are): a tiny random checkpoint of each kind
(tests/tiny_models.py), its logits in fp32 and bfloat16 and on every attention backend, 64
greedy tokens through the real engine with and without a PEFT adapter, and the same tokens at
tp 2 and 4 (ep 4 for mixtures of experts) on simulated CPU devices.

Kinds whose family is not registered in jaxserve.model.families.FAMILIES are skipped (checked
at collection). The tp subprocesses start together when the module's fixture builds the
checkpoints, so their compiles overlap the in-process checks.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from tests import family_check as fc

KINDS = [pytest.param(k, marks=pytest.mark.skipif(
    not fc.registered(k), reason=f"no registered family serves {fc.HF_ARCH[k]} yet"))
    for k in fc.KINDS]


def _selected(request, test=None) -> set:
    """The kinds this session runs tests of (of `test` only, if given)."""
    return {item.callspec.params["kind"] for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec")
            and (test is None or item.originalname == test)}


@pytest.fixture(scope="module")
def tinies(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    kinds = _selected(request)
    ts = {k: fc.build(k, str(root), seed=i) for i, k in enumerate(fc.KINDS) if k in kinds}
    procs = {k: fc.start_tp(ts[k]) for k in _selected(request, "test_tp_greedy_matches_hf_and_peft")}
    yield ts, procs, {}
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def _ours(tinies, kind):
    """Our model loaded from the checkpoint, and the HF reference tokens (computed once)."""
    from jaxserve.loader import load_hf_dir
    ts, _, cache = tinies
    if kind not in cache:
        t = ts[kind]
        ids = np.random.default_rng(fc.KINDS.index(kind)).integers(3, 512,
                                                                    sum(fc.CHUNKS)).tolist()
        cache[kind] = dict(model=load_hf_dir(t.path), ids=ids, logits=fc.hf_logits(t.hf, ids),
                           refs=fc.references(t))
    return ts[kind], cache[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(kind, tinies):
    _, c = _ours(tinies, kind)
    ours = fc.paged_logits(c["model"], c["ids"])
    np.testing.assert_allclose(ours, c["logits"], atol=fc.FP32_ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_close_to_hf(kind, tinies):
    _, c = _ours(tinies, kind)
    ours = fc.paged_logits(c["model"], c["ids"], dtype=jnp.bfloat16)
    ref = c["logits"]
    tol = fc.BF16_ATOL * max(1.0, np.abs(ref).max() / 5)
    per_position = np.abs(ours - ref).max(axis=1)
    if kind in fc.MOE:
        # a router tie within bfloat16's rounding picks another expert for one token in one
        # layer (measured: 1 position of 17 at 0.23, the rest under 0.07); a wrong expert
        # computation or routing rule moves every position
        assert (per_position < tol).mean() >= 0.85, per_position
    else:
        assert per_position.max() < tol, per_position


@pytest.mark.parametrize("backend", ["cpu", "pallas"])
@pytest.mark.parametrize("kind", KINDS)
def test_attention_backends_match_hf(kind, backend, tinies):
    """The CPU native kernels and the Pallas kernels (interpret mode) run the family's
    attention (windows, soft caps) as XLA does."""
    if backend == "cpu":
        from jaxserve.backends.cpu import backend as cpu
        reason = cpu.unavailable_reason(1)
        if reason is not None:
            pytest.skip(f"native CPU kernels unavailable: {reason}")
    _, c = _ours(tinies, kind)
    ours = fc.paged_logits(c["model"], c["ids"], backend=backend)
    np.testing.assert_allclose(ours, c["logits"], atol=fc.FP32_ATOL, rtol=0)


def _assert_tokens(got, refs, what):
    for which in ("base", "lora"):
        for i, (g, r) in enumerate(zip(got[which], refs[which])):
            assert g == r, f"{what}: {which} prompt {i}: first difference at token " \
                           f"{next(j for j, (a, b) in enumerate(zip(g, r)) if a != b)}"


@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_matches_hf_and_peft(kind, tinies):
    t, c = _ours(tinies, kind)
    refs = c["refs"]
    # the adapter changes every continuation, or equality with PEFT would prove nothing
    assert all(a != b for a, b in zip(refs["base"], refs["lora"]))
    _assert_tokens(fc.engine_greedy(t), refs, f"{kind} tp=1")


@pytest.mark.parametrize("kind", KINDS)
def test_tp_greedy_matches_hf_and_peft(kind, tinies):
    t, c = _ours(tinies, kind)
    res = fc.tp_result(tinies[1][kind])
    assert res["devices"] == 8
    for tp, ep in fc.parallel_runs(kind):
        _assert_tokens(res[f"{tp}x{ep}"], c["refs"], f"{kind} tp={tp} ep={ep}")
