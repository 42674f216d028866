import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs.base import get_config
from vlm_jax import parallel
from vlm_jax.train import loop
from vlm_jax.train.optim import optimizer_state_bytes
from vlm_jax.train.param_groups import ParamGroups
from vlm_jax.image_inputs import make
from vlm_jax.layers.loss import masked_cross_entropy
from vlm_jax.train.step import make_train_step
from tests.helpers import first_batch, tiny_config

ONE_DEVICE = ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "batch_size=2")
RULES = [("vision/layers/.*", "vit_top", "1:"), ("vision/.*", "frozen"), ("connector/.*", "connector"),
         ("decoder/.*", "llm")]


def grouped_config(*extra: str, **groups: dict):
    config = tiny_config(*ONE_DEVICE, "optim.warmup_steps=0", *extra)
    config.optim.trainable = RULES
    config.optim.groups = ml_collections.ConfigDict(groups)
    return config


def run_steps(config, steps: int):
    setup = loop.Setup(config, jax.devices()[:1])
    state = setup.fresh_state()
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
    batch = parallel.global_batch(first_batch(config), setup.mesh)
    for _ in range(steps):
        state, _ = step(state, batch)
    return setup, before, traverse_util.flatten_dict(jax.device_get(state.params)), state, batch


def test_frozen_params_and_layers_stay_bit_identical_and_only_trainable_groups_have_state():
    config = grouped_config(connector=dict(lr=1e-3), llm=dict(lr=1e-4, weight_decay=0.1), vit_top=dict(lr=5e-4))
    setup, before, after, state, _ = run_steps(config, 3)
    vision_layers = [p for p in before if p[:2] == ("vision", "layers")]
    assert vision_layers
    for path in before:
        if path[0] == "vision" and path not in vision_layers:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    for path in vision_layers:  # layer 0 frozen bit for bit, layer 1 trains
        np.testing.assert_array_equal(before[path][0], after[path][0], err_msg=str(path))
        assert np.any(before[path][1] != after[path][1]), path
    for path in before:
        if path[0] in ("connector", "decoder"):
            assert np.any(before[path] != after[path]), path
    # Adam state (mu, nu) exists for exactly the trainable leaves; nothing for the frozen groups.
    trainable = jax.tree.leaves(state.trainable)
    # Besides mu and nu: an int32 Adam count and schedule count per trainable group (3 groups).
    assert optimizer_state_bytes(state.opt_state) == 2 * optimizer_state_bytes(trainable) + 3 * 2 * 4
    assert "stem" not in state.trainable["vision"] and "stem" in state.frozen["vision"]
    table = {r["group"]: r for r in setup.groups.table()}
    assert set(table) == {"vit_top", "frozen", "connector", "llm"}
    assert table["llm"]["lr"] == 1e-4 and table["llm"]["weight_decay"] == 0.1 and table["frozen"]["frozen"]
    half = sum(v.size for p, v in before.items() if p in vision_layers) // 2
    assert table["vit_top"]["params"] == half
    assert sum(r["params"] for r in table.values()) == sum(v.size for v in before.values())


def test_sgd_update_sizes_follow_group_learning_rates():
    config = grouped_config("optim.optimizer=sgd", "optim.clip_norm=0.0", "optim.schedule=constant",
                            "optim.weight_decay=0.0",
                            connector=dict(lr=0.5), llm=dict(lr=0.05), vit_top=dict(lr=0.2))
    setup, before, after, _, batch = run_steps(config, 1)

    def loss(params):
        logits = setup.model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                   make(setup.config.model).select(batch))
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    grads = traverse_util.flatten_dict(jax.device_get(jax.jit(jax.grad(loss))(
        traverse_util.unflatten_dict(before))))

    def rate(group_prefix: str) -> float:
        paths = [p for p in before if p[0] == group_prefix]
        step = np.sqrt(sum(np.sum((after[p] - before[p]).astype(np.float64) ** 2) for p in paths))
        grad = np.sqrt(sum(np.sum(grads[p].astype(np.float64) ** 2) for p in paths))
        return step / grad

    np.testing.assert_allclose(rate("connector") / rate("decoder"), 0.5 / 0.05, rtol=1e-3)
    np.testing.assert_allclose(rate("connector"), 0.5, rtol=1e-3)


def _groups(rules, **groups):
    o = get_config().optim
    o.trainable = rules
    o.groups = ml_collections.ConfigDict(groups)
    params = {"vision": {"layers": {"w": np.zeros((4, 2))}, "stem": {"w": np.zeros(2)}},
              "decoder": {"w": np.zeros(2)}}
    return ParamGroups(params, o)


def test_group_table_errors_name_the_offender():
    ok = [("vision/layers/.*", "top", "2:"), ("vision/.*", "frozen"), (".*", "llm")]
    assert _groups(ok).layer_masks[("vision", "layers", "w")].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="connector.*named by no"):
        _groups(ok, connector=dict(lr=1.0))
    with pytest.raises(ValueError, match=r"optim.groups.llm: unknown key\(s\) \['learning_rate'\]"):
        _groups(ok, llm=dict(learning_rate=1.0))
    with pytest.raises(ValueError, match="vision/stem/w, which is not a scanned layer stack"):
        _groups([("vision/.*", "top", "2:"), (".*", "llm")])
    with pytest.raises(ValueError, match="selects no trainable layer"):
        _groups([("vision/layers/.*", "top", "8:"), (".*", "llm")])
    with pytest.raises(ValueError, match="always frozen"):
        _groups(ok, frozen=dict(frozen=False))
    frozen_llm = _groups(ok, llm=dict(frozen=True))
    assert set(frozen_llm.trainable_labels.values()) == {"top"}
