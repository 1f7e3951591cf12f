"""Random sequences of ggml-lora's public API, run by test_stateful.py in a child process so
that a crash shows up as a signal instead of killing pytest.

    python tests/stateful_api.py MODEL.gguf N_EXAMPLES

The machine keeps a shadow of what should be open: closing a parent closes its children, every use of
a closed object must raise ValueError, and results must be consistent (logits deterministic, a fresh
or saved-and-reloaded adapter gives the logits it should, a step changes only its own adapter).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext

MODEL_PATH = Path(sys.argv[1]) if __name__ == "__main__" else None
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TMP = Path(tempfile.mkdtemp(prefix="glora-stateful-"))
counter = [0]


def tokens_strategy(n_vocab: int = 256):
    return st.lists(st.integers(0, n_vocab - 1), min_size=1, max_size=40)


class API(RuleBasedStateMachine):
    models = Bundle("models")
    adapters = Bundle("adapters")
    contexts = Bundle("contexts")

    def __init__(self):
        super().__init__()
        self.all: list = []                   # every object made, to check `closed` against the shadow
        self.parent: dict[int, object] = {}
        self.dead: set[int] = set()           # ids of objects that must be closed
        self.base_logits: dict[int, np.ndarray] = {}

    # ---- shadow ---------------------------------------------------------------------------------
    def _track(self, obj, parent=None):
        self.all.append(obj)
        if parent is not None:
            self.parent[id(obj)] = parent
        return obj

    def _close_shadow(self, obj):
        self.dead.add(id(obj))
        for o in self.all:
            if self.parent.get(id(o)) is obj:
                self._close_shadow(o)

    def _is_dead(self, obj) -> bool:
        return id(obj) in self.dead

    def _expect(self, fn, *objs):
        """Run fn; it must raise ValueError('... closed ...') iff one of objs is (shadow-)closed."""
        if any(self._is_dead(o) for o in objs):
            try:
                fn()
            except ValueError as e:
                assert "closed" in str(e), e
                return None
            raise AssertionError(f"{fn} ran on a closed object")
        return fn()

    # ---- rules ------------------------------------------------------------------------------------
    @initialize(target=models)
    def first_model(self):
        return self._track(BaseModel.load(MODEL_PATH, n_threads=1))

    # loading parses the GGUF's vocabulary in Python (~0.1 s): a second model per sequence is enough to
    # catch objects of one model used with another
    @precondition(lambda self: sum(isinstance(o, BaseModel) for o in self.all) < 2)
    @rule(target=models)
    def load(self):
        return self._track(BaseModel.load(MODEL_PATH, n_threads=1))

    @rule(target=adapters, model=models, rank=st.integers(1, 8),
          modules=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True), seed=st.integers(0, 9))
    def init_adapter(self, model, rank, modules, seed):
        cfg = LoRAConfig(rank=rank, target_modules=tuple(modules), seed=seed)
        ad = self._expect(lambda: Adapter.init(model, cfg), model)
        if ad is None:
            return self._track(_Closed(), model)
        return self._track(ad, model)

    @rule(target=adapters, adapter=adapters)
    def save_and_load(self, adapter):
        if isinstance(adapter, _Closed):
            return adapter
        counter[0] += 1
        path = TMP / f"a{counter[0]}.gguf"
        saved = self._expect(lambda: adapter.save(path), adapter)
        if saved is None:
            assert not path.exists()
            return adapter
        model = adapter.model
        loaded = Adapter.load(model, path)
        for name in adapter.targets:
            for x, y in zip(adapter.get(name), loaded.get(name)):
                np.testing.assert_array_equal(x, y)
        path.unlink()
        return self._track(loaded, model)

    @rule(model=models, adapter=st.none() | adapters, tokens=tokens_strategy())
    def logits(self, model, adapter, tokens):
        if isinstance(adapter, _Closed) or (adapter is not None and adapter.model is not model):
            adapter = None
        objs = (model,) if adapter is None else (model, adapter)
        out = self._expect(lambda: model.logits(tokens, adapter), *objs)
        if out is None:
            return
        assert out.shape == (len(tokens), model.n_vocab) and np.isfinite(out).all()
        again = model.logits(tokens, adapter)
        np.testing.assert_array_equal(out, again)            # same graph, same inputs: deterministic
        if adapter is not None and all(not b.any() for _, b in adapter.tensors().values()):
            np.testing.assert_array_equal(out, model.logits(tokens))   # B = 0: exactly the base model

    @rule(model=models, tokens=tokens_strategy())
    def logits_in_threads(self, model, tokens):
        if self._is_dead(model):
            return
        want = model.logits(tokens)
        got: list = [None, None]

        def run(i):
            got[i] = model.logits(tokens)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g in got:
            np.testing.assert_array_equal(g, want)

    @rule(target=contexts, adapter=adapters, checkpointing=st.booleans())
    def new_context(self, adapter, checkpointing):
        if isinstance(adapter, _Closed):
            return adapter
        ctx = self._expect(lambda: TrainingContext(adapter, gradient_checkpointing=checkpointing), adapter)
        if ctx is None:
            return self._track(_Closed(), adapter)
        return self._track(ctx, adapter)

    @rule(ctx=contexts, tokens=st.lists(st.integers(0, 255), min_size=2, max_size=40))
    def step(self, ctx, tokens):
        if isinstance(ctx, _Closed):
            return
        if self._is_dead(ctx):
            self._expect(lambda: ctx.grad_norm(), ctx)
            return
        model = ctx.adapter.model
        batch = loss_batch(model, tokens)
        others = [a for a in self.all if isinstance(a, Adapter) and a is not ctx.adapter and not self._is_dead(a)]
        before = [a.tensors() for a in others]
        res = ctx.step([batch], 1e-2, 1, max_grad_norm=1.0)
        assert np.isfinite(res.loss) and not res.skipped
        for a, t in zip(others, before):                    # a step changes only its own adapter
            for name, (x, y) in a.tensors().items():
                np.testing.assert_array_equal(x, t[name][0])
                np.testing.assert_array_equal(y, t[name][1])

    @rule(obj=models | adapters | contexts)
    def close(self, obj):                    # closed objects stay in the bundles: later rules use them
        if isinstance(obj, _Closed):
            return
        obj.close()
        self._close_shadow(obj)

    @rule()
    def collect_garbage(self):
        # finalizers at an arbitrary point: children must have kept their parents alive
        import gc

        gc.collect(0)

    @invariant()
    def closed_matches_shadow(self):
        for o in self.all:
            if not isinstance(o, _Closed):
                assert o.closed == self._is_dead(o), (o, o.closed)

    def teardown(self):
        for o in reversed(self.all):
            if not isinstance(o, _Closed):
                o.close()


class _Closed:
    """Stands for an object whose creation was refused because its parent was closed."""
    closed = True


if __name__ == "__main__":
    n_examples = int(sys.argv[2])
    run_state_machine_as_test(API, settings=settings(
        max_examples=n_examples, stateful_step_count=20, deadline=None, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck)))
    print(f"stateful: {n_examples} sequences passed")
