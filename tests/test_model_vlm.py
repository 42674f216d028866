import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.base import get_config
from vlm_jax.data import navit
from vlm_jax.data.packing import tokens_per_tile
from vlm_jax.image_inputs.tiles import windows_first
from vlm_jax.model import VLM

B, T, L, S = 2, 3, 24, 28
P = (S // 14) ** 2  # 4 visual tokens per tile


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """The base `model` config shrunk to a few thousand parameters (GQA decoder, odd vocab)."""
    c = get_config().model
    c.vision.update(image_size=S, patch_size=14, width=32, depth=3, heads=4, mlp_dim=64)
    c.connector.in_norm = True
    c.text.update(vocab_size=101, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=64)
    c.update(overrides)
    return c


def tiny_batch(seed: int = 0) -> dict[str, jax.Array]:
    """Row 0: a 2-tile image at positions 2..9 plus a padded tile slot; row 1: a 1-tile image at 5..8,
    two padded slots, then right padding."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (B, L), 1, 101)
    segment_ids = jnp.asarray([[1] * L, [1] * 18 + [0] * 6], jnp.int32)
    dest = np.full((B, T * P), L, np.int32)
    dest[0, :2 * P] = np.arange(2, 2 + 2 * P)
    dest[1, :P] = np.arange(5, 5 + P)
    tile_mask = jnp.asarray([[True, True, False], [True, False, False]])
    tiles = jax.random.normal(k2, (B, T, S, S, 3)) * tile_mask[:, :, None, None, None]
    return dict(tokens=tokens, positions=jnp.broadcast_to(jnp.arange(L), (B, L)), segment_ids=segment_ids,
                tiles=tiles, tile_mask=tile_mask, image_dest=jnp.asarray(dest))


def forward_args(batch: dict) -> tuple:
    """A tiled batch as the VLM's forward takes it: tokens, positions, segment_ids, images."""
    images = {k: batch[k] for k in ("tiles", "tile_mask", "image_dest")}
    return batch["tokens"], batch["positions"], batch["segment_ids"], images


def random_params(model: nn.Module, *args, seed: int = 0, method=None) -> dict:
    """O(1)-scale random params with the init's tree (of `method`, default __call__), without compiling the
    (slow on CPU) RNG init."""
    init = functools.partial(model.init, method=method)
    shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)

    def fill(path, s: jax.ShapeDtypeStruct) -> np.ndarray:
        noise = rng.standard_normal(s.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.2 * noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


MODEL = VLM(tiny_model_config())


@jax.jit
def forward(params: dict, batch: dict[str, jax.Array]) -> jax.Array:
    return MODEL.apply({"params": params}, *forward_args(batch))


@functools.cache
def _params() -> dict:
    return random_params(MODEL, *forward_args(tiny_batch()))


def test_logits_shape_and_param_tree():
    params = _params()
    assert set(params) == {"vision", "connector", "decoder"}
    assert set(params["decoder"]) == {"embed_tokens", "layers", "final_norm", "lm_head"}
    # feature_layer=-2 of a depth-3 tower needs only two blocks.
    assert params["vision"]["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)
    logits = forward(params, tiny_batch())
    assert logits.shape == (B, L, 101) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_padded_tile_slots_have_no_effect():
    params, batch = _params(), tiny_batch()
    # Garbage pixels in padded slots, and padded slots pointing at real positions: tile_mask wins.
    pad = ~batch["tile_mask"][:, :, None, None, None]
    noisy = dict(batch, tiles=jnp.where(pad, 7.0, batch["tiles"]),
                 image_dest=jnp.where(jnp.repeat(batch["tile_mask"], P, axis=1), batch["image_dest"], 0))
    np.testing.assert_array_equal(np.asarray(forward(params, noisy)), np.asarray(forward(params, batch)))


def test_visual_tokens_land_at_image_dest():
    params, batch = _params(), tiny_batch()

    @jax.jit
    def parts(params, batch):
        bound = MODEL.bind({"params": params})
        tokens, _, _, images = forward_args(batch)
        return bound.embed(tokens, images), bound.encode_images(images), bound.decoder.embed(tokens)

    x, visual, text = (np.asarray(a) for a in parts(params, batch))
    assert visual.shape == (B, T * P, 32)
    for b, n_real in ((0, 2 * P), (1, P)):
        dest = np.asarray(batch["image_dest"][b, :n_real])
        np.testing.assert_array_equal(x[b, dest], visual[b, :n_real])
        rest = np.setdiff1d(np.arange(L), dest)
        np.testing.assert_array_equal(x[b, rest], text[b, rest])


def test_placeholder_ids_are_overwritten_even_out_of_vocab():
    params, batch = _params(), tiny_batch()
    real = jnp.repeat(batch["tile_mask"], P, axis=1)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], real.shape)
    dest = jnp.where(real, batch["image_dest"], L)
    oov = dict(batch, tokens=batch["tokens"].at[rows, dest].set(10**6, mode="drop"))
    logits = np.asarray(forward(params, oov))
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, np.asarray(forward(params, batch)))


def test_tile_merge_groups_each_2x2_window_like_navit():
    """windows_first puts a tile's row-major patch grid into NaViT's window order, so merge_size on tiles
    concatenates the four patches of each 2x2 window (and tokens_per_tile counts one slot per window)."""
    g, m = 4, 2
    grid = np.arange(g * g, dtype=np.float32).reshape(1, g * g, 1)
    rows, cols = navit.patch_positions((1, g, g), m).T
    np.testing.assert_array_equal(np.asarray(windows_first(jnp.asarray(grid), m))[0, :, 0], rows * g + cols)
    with pytest.raises(ValueError, match="square grid"):
        windows_first(jnp.zeros((1, g * g + 1, 1)), m)

    c = get_config()
    c.model.vision.update(patch_size=8, drop_cls=True)
    c.model.connector.merge_size = 2
    assert tokens_per_tile(c.model, 32) == 4
    c.model.vision.drop_cls = False
    with pytest.raises(ValueError, match="drop_cls"):
        tokens_per_tile(c.model, 32)
