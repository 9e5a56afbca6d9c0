"""The catalog's engine concurrency: passed to each engine with its own flag, and the default
batch cap per engine derived from it."""

from __future__ import annotations

import pytest

from runtimes.catalog import ModelCatalog, ModelSpec
from runtimes.engines import engine_for
from runtimes.policy import batch_per_engine


def _spec(engine: str, args: tuple[str, ...] = (), **fields) -> ModelSpec:
    return ModelSpec(id="org/model", engine=engine, gpus=1, args=args, **fields)


@pytest.mark.parametrize(("engine", "flag"), [
    ("vllm", "--max-num-seqs"), ("sglang", "--max-running-requests"),
    ("sim", "--max-concurrency"),
])
def test_max_concurrency_reaches_the_engine_once(engine, flag):
    spec = _spec(engine, max_concurrency=128)
    argv = engine_for(spec).argv(spec, "127.0.0.1", 8000, in_container=True)
    assert argv[argv.index(flag) + 1] == "128"
    # engine_args win: the flag is not given twice.
    own = _spec(engine, (flag, "32"), max_concurrency=128)
    argv = engine_for(own).argv(own, "127.0.0.1", 8000, in_container=True)
    assert argv.count(flag) == 1 and argv[argv.index(flag) + 1] == "32"
    assert engine_for(own).concurrency(own) == 32
    inline = _spec(engine, (f"{flag}=48",))
    assert engine_for(inline).concurrency(inline) == 48
    # Unset: the engine's own default, not guessed, and no flag.
    bare = _spec(engine)
    assert flag not in engine_for(bare).argv(bare, "127.0.0.1", 8000, in_container=True)
    assert engine_for(bare).concurrency(bare) is None


def test_the_batch_cap_per_engine_follows_the_catalog():
    assert batch_per_engine(_spec("vllm"), 64) == 64  # nothing known: the setting
    assert batch_per_engine(_spec("vllm", max_concurrency=256), 64) == 192  # 3/4 of the engine
    assert batch_per_engine(_spec("vllm", ("--max-num-seqs", "40")), 64) == 30
    assert batch_per_engine(_spec("sim", ("--max-concurrency", "1")), 64) == 1
    explicit = _spec("vllm", max_concurrency=256, batch_max_inflight=100)
    assert batch_per_engine(explicit, 64) == 100


def test_catalog_fields():
    catalog = ModelCatalog.from_document({"models": [
        {"id": "a", "max_concurrency": 96, "batch_max_inflight": 48},
        {"id": "b"},
    ]}, "vllm")
    a, b = catalog.get("a"), catalog.get("b")
    assert (a.max_concurrency, a.batch_max_inflight) == (96, 48)
    assert (b.max_concurrency, b.batch_max_inflight) == (None, None)
