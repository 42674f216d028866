import os

# Eight fake CPU devices so every sharding path runs; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs every fake device's thunks, collectives included, on one pool sized by NPROC (else about the device
# count). A collective blocks its thread until all eight devices join it, and a device may start two independent
# collectives in either order: with a thread per device, eight threads blocked in two different collectives leave
# none to start the rest, and the run aborts after XLA's stuck-collective timeout. Four threads a device leave room.
os.environ.setdefault("NPROC", "32")


import gc  # noqa: E402  (after XLA_FLAGS: pytest imports this file before any test module imports jax)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled programs and traces after each test file: a file's programs are rarely reused by the
    next, and a whole run on 8 fake devices would otherwise hold every one of them in memory until it ends."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """A workdir of the tiny demo config trained 2 steps (checkpoint at step 2): what the chat and evaluation tests
    load."""
    from tests.helpers import tiny_config
    from vlm_jax.train import loop

    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    loop.train(tiny_config("total_steps=2", "checkpoint_every=2", "eval_batch_size=8", "eval_examples=8"), workdir)
    return workdir


_LOADED: dict[tuple[str, str], object] = {}


@pytest.fixture
def loaded_once(monkeypatch):
    """Assistant.load memoised per source and config for the whole session: the chat and eval commands still run
    end to end, loading each checkpoint once, without compiling the same generation again for every call."""
    from vlm_jax.config import to_json
    from vlm_jax.inference import Assistant, inference_config

    load = Assistant.load.__func__

    def memoised(cls, source, config=None):
        config = config or inference_config(source)
        key = (source, to_json(config))
        if key not in _LOADED:
            _LOADED[key] = load(cls, source, config)
        return _LOADED[key]

    monkeypatch.setattr(Assistant, "load", classmethod(memoised))
