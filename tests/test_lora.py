import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vlm_jax.layers.lora import LORA_A, LORA_B, LoraSpec, has_lora, merge_lora
from vlm_jax.image_inputs import make
from vlm_jax.model import VLM
from vlm_jax import parallel
from vlm_jax.train import loop
from vlm_jax.train.step import make_train_step
from tests.helpers import first_batch, tiny_config

LORA = ("model.lora.rank=4", "model.lora.alpha=8.0")


def _inputs(config):
    batch = first_batch(config)
    images = {k: jnp.asarray(v) for k, v in make(config.model).select(batch).items()}
    return batch, (*(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")), images)


def test_fresh_lora_gives_base_logits_and_merge_matches_unmerged():
    config = tiny_config("batch_size=2", *LORA)
    base_config = tiny_config("batch_size=2")
    batch, inputs = _inputs(config)
    params = nn.meta.unbox(VLM(config.model).init(jax.random.key(0), *inputs)["params"])
    flat = traverse_util.flatten_dict(params)
    adapted = sorted("/".join(p[:-1]) for p in flat if p[-1] == LORA_A)
    assert adapted == [f"decoder/layers/{m}" for m in
                       ("attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
                        "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")]
    assert all(not np.any(v) for p, v in flat.items() if p[-1] == LORA_B)
    spec = LoraSpec.from_config(config.model.lora)
    base_params = merge_lora(params, spec)  # B = 0: the base weights, unchanged
    assert not has_lora(base_params)
    base = VLM(base_config.model).apply({"params": base_params}, *inputs)
    fresh = VLM(config.model).apply({"params": params}, *inputs)
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))

    # Non-zero adapters: merging them into the kernels gives the same model.
    keys = iter(jax.random.split(jax.random.key(1), len(flat)))
    flat = {p: (0.3 * jax.random.normal(next(keys), v.shape) if p[-1] == LORA_B else v) for p, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
    unmerged = VLM(config.model).apply({"params": params}, *inputs)
    merged = VLM(base_config.model).apply({"params": merge_lora(params, spec)}, *inputs)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=1e-5)


def test_lora_recipe_trains_only_adapters_and_projector_at_their_rates():
    config = tiny_config("batch_size=2", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "optim.warmup_steps=0",
                         "model.lora.rank=4", "model.lora.dropout=0.1")
    config.optim.trainable = [(".*/lora_[ab]", "lora"), ("connector/.*", "connector"), (".*", "frozen")]
    config.optim.groups = ml_collections.ConfigDict(dict(lora=dict(lr=1e-3), connector=dict(lr=1e-4)))
    setup = loop.Setup(config, jax.devices()[:1])
    state = setup.fresh_state()
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
    batch = parallel.global_batch(first_batch(config), setup.mesh)
    for _ in range(2):
        state, _ = step(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params))
    for path, old in before.items():
        moved = np.any(old != after[path])
        assert moved == (path[-1] in (LORA_A, LORA_B) or path[0] == "connector"), path
    assert {r["group"] for r in setup.groups.table()} == {"lora", "connector", "frozen"}
