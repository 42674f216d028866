"""The chunked training loss (model.loss_chunk_tokens): the same per-token NLL, loss and gradients as the logits of
every position at once, for lm_head, lm_head with LoRA and tied embeddings, chunks that divide the rows and ones
that do not, bf16 compute; the same train step on the 8-device mesh; and a compiled step that never holds fp32
[B, L, vocab]."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.base import get_config
from tests.helpers import first_batch, tiny_config
from vlm_jax import parallel
from vlm_jax.layers.lora import LoraSpec
from vlm_jax.image_inputs import make
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.model import forward_loss
from vlm_jax.text.decoder import Decoder
from vlm_jax.train import loop
from vlm_jax.layers.loss import chunked_loss, masked_cross_entropy, masked_mean, masked_sum, token_nll
from vlm_jax.train.step import make_train_step

VOCAB, HIDDEN, ROWS, LENGTH = 1000, 32, 2, 16


def head(kind: str, dtype=jnp.float32) -> tuple[Decoder, dict, jax.Array, jax.Array, jax.Array]:
    """A decoder with output head `kind` (lm_head | lora | tied), its params (a LoRA's B nonzero, so both
    adapters get gradients), hidden states, targets and a loss mask."""
    text = get_config().model.text
    text.update(vocab_size=VOCAB, hidden=HIDDEN, layers=1, heads=2, kv_heads=2, head_dim=16, ffn=64, rms_eps=1e-5,
                rope_base=1e4, qkv_bias=False, tie_embeddings=kind == "tied")
    lora = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets="lm_head") if kind == "lora" else None
    decoder = Decoder(text, ModuleOptions(dtype=dtype, lora=lora))
    keys = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(keys[0], (ROWS, LENGTH, HIDDEN))
    params = nn.unbox(decoder.init(keys[1], h, method=Decoder.logits)["params"])
    if kind == "lora":
        params["lm_head"]["lora_b"] = 0.1 * jax.random.normal(keys[2], params["lm_head"]["lora_b"].shape)
    targets = jax.random.randint(keys[3], (ROWS, LENGTH), 0, VOCAB)
    mask = jax.random.bernoulli(keys[4], 0.7, (ROWS, LENGTH))
    return decoder, params, h, targets, mask


def nll_and_grads(decoder: Decoder, params: dict, h: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int):
    """Per-token NLL, and the gradients of the masked mean loss w.r.t. (params, hidden states)."""
    def loss(p, x):
        total, nll = decoder.apply({"params": p}, x, targets, mask, chunk, method=Decoder.loss)
        return total / mask.sum(), nll

    (_, nll), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, h)
    return nll, grads


@pytest.mark.parametrize("chunk", [4, 5], ids=["divides", "pads"])
@pytest.mark.parametrize("kind", ["lm_head", "lora", "tied"])
def test_chunked_nll_and_grads_equal_the_plain_ones(kind, chunk):
    decoder, params, h, targets, mask = head(kind)
    want_nll, want_grads = nll_and_grads(decoder, params, h, targets, mask, 0)
    got_nll, got_grads = nll_and_grads(decoder, params, h, targets, mask, chunk)
    np.testing.assert_array_equal(jnp.isnan(got_nll), ~mask)
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-6)
    np.testing.assert_allclose(masked_mean(got_nll, mask)[0], masked_mean(want_nll, mask)[0], rtol=1e-6)
    flat_want, flat_got = jax.tree.leaves_with_path(want_grads), jax.tree.leaves(got_grads)
    assert len(flat_want) == {"lm_head": 2, "lora": 4, "tied": 2}[kind]
    for (path, want), got in zip(flat_want, flat_got):
        assert float(jnp.abs(want).max()) > 0, path
        # The chunks sum their products in another order than the whole head, so fp32 rounding differs by a few
        # ulps of the tensor's largest entry, more on some CPUs' vector widths than others.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_chunked_nll_in_bf16_accumulates_in_fp32():
    """bf16 logits, each chunk's the same values the whole head gives; their sums run in fp32 either way."""
    decoder, params, h, targets, mask = head("lm_head", jnp.bfloat16)
    want, _ = nll_and_grads(decoder, params, h, targets, mask, 0)
    got, _ = nll_and_grads(decoder, params, h, targets, mask, 5)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("weighted", [((11, 12, 13, 14, 15), (9,)), ((), ())], ids=["some", "none"])
def test_chunks_without_weighted_positions_are_skipped(weighted):
    """The rows (of one device) are joined and the weighted positions go to the front before they are cut into
    chunks: 5 of 16 at the end of one row and 1 in the other take 2 chunks of 4, 8 positions, where chunking each
    row would compute 16, and the other 6 chunks never reach the output matrix. The loss, NLL and gradients are the
    whole logits' at the weighted positions."""
    keys = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(keys[0], (ROWS, LENGTH, HIDDEN))
    kernel = jax.random.normal(keys[1], (HIDDEN, VOCAB)) / HIDDEN ** 0.5
    targets = jax.random.randint(keys[2], (ROWS, LENGTH), 0, VOCAB)
    rows = jnp.array([0] * len(weighted[0]) + [1] * len(weighted[1]), int)
    weights = jnp.zeros((ROWS, LENGTH)).at[rows, jnp.array(weighted[0] + weighted[1], int)].set(1.0)
    computed = []

    def project(a, p):
        positions = a["x"].size // a["x"].shape[-1]
        jax.debug.callback(lambda: computed.append(positions))
        return a["x"] @ p["kernel"]

    def chunked(x, w):
        return chunked_loss(project, {"x": x}, {"kernel": w}, targets, weights, VOCAB, 4)

    def plain(x, w):
        nll = token_nll(x @ w, targets)
        return masked_sum(nll, weights)[0], jnp.where(weights != 0, nll, jnp.nan)

    (got, got_nll), got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(h, kernel)
    assert computed == [4, 4] if weighted[0] else not computed
    (want, want_nll), want_grads = jax.value_and_grad(plain, (0, 1), has_aux=True)(h, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(float(jnp.abs(w).max()), 1e-30))


def test_the_loss_joins_each_devices_rows():
    """chunked_loss joins the rows of each batch shard of the mesh in context, never rows of two devices: as many
    groups as the act_batch rule splits the batch into (the mesh axes that divide it), one without a mesh."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    assert parallel.batch_shards_in_context(8) == 1
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
        assert [parallel.batch_shards_in_context(rows) for rows in (8, 6, 3)] == [4, 2, 1]


def test_negative_chunk_is_an_error():
    decoder, params, h, targets, _ = head("lm_head")
    with pytest.raises(ValueError, match="model.loss_chunk_tokens must be >= 0"):
        decoder.apply({"params": params}, h, targets, targets > 0, -1, method=Decoder.loss)


def test_rows_in_one_chunk_are_the_logits_loss_bit_for_bit():
    """The demo's rows of 128 tokens under the default chunk: the loss and gradients of the logits of every
    position at once, bit for bit (its committed accuracy figures depend on it)."""
    config = tiny_config("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "batch_size=2", "model.text.layers=1",
                         "model.vision.depth=1")
    assert config.data.seq_len <= config.model.loss_chunk_tokens
    setup = loop.Setup(config, jax.devices()[:1])
    params, batch = setup.fresh_state().params, first_batch(config)

    def logits_loss(p):
        logits = setup.model.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                   make(config.model).select(batch))
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    def nll_loss(p):
        total, _ = forward_loss(setup.model, {"params": p}, batch, batch["loss_mask"])
        return total / jnp.maximum(batch["loss_mask"].sum(), 1.0)

    want, got = (jax.jit(jax.value_and_grad(f))(params) for f in (logits_loss, nll_loss))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_train_step_with_chunked_loss_matches_the_plain_one():
    """One step on the fsdp x tensor mesh of 8 devices with a vocabulary of 3000 (split over the tensor axis) and
    rows of 128 tokens in 3 chunks of 48 (16 padding positions), as one pass and as 2 micro-batches."""
    metrics = {}
    for chunk in (0, 48):
        config = tiny_config("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.text.layers=1",
                             "model.vision.depth=1", "model.text.vocab_size=3000", f"model.loss_chunk_tokens={chunk}")
        setup = loop.Setup(config, None)
        state, batch = setup.fresh_state(), parallel.global_batch(first_batch(config), setup.mesh)
        for micro_batches in (1, 2):
            step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings,
                                   micro_batches=micro_batches)
            # The step donates its state: each call gets a copy.
            _, out = step(jax.tree.map(jnp.copy, state), batch)
            metrics[chunk, micro_batches] = {k: float(v) for k, v in out.items()}
    for micro_batches in (1, 2):
        plain, chunked = metrics[0, micro_batches], metrics[48, micro_batches]
        assert chunked["loss_tokens"] == plain["loss_tokens"] > 0
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-6, err_msg=f"{key}, {micro_batches}")


def test_chunked_step_never_holds_the_fp32_logits():
    rows, length, vocab = 4, 256, 32768
    logits_bytes = rows * length * vocab * 4

    def temp_bytes(chunk: int) -> int:
        config = tiny_config("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", f"batch_size={rows}",
                             f"data.seq_len={length}", f"model.text.vocab_size={vocab}",
                             f"model.loss_chunk_tokens={chunk}")
        setup = loop.Setup(config, jax.devices()[:1])
        state, batch = setup.fresh_state(), parallel.global_batch(first_batch(config), setup.mesh)
        step = make_train_step(setup.model, setup.optimizer, setup.mesh, setup.state_shardings)
        with jax.set_mesh(setup.mesh):
            return step.jitted.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(0), temp_bytes(32)
    assert plain > 2 * logits_bytes, (plain, logits_bytes)  # the logits and their gradient
    assert chunked < plain / 3 and chunked < logits_bytes, (chunked, plain, logits_bytes)


# Image placeholder ids as targets, always under a zero loss mask: LLaVA's -200, one wrapping from the end in
# [-vocab, 0), the vocabulary size (Vicuna's 32000) and past it.
PLACEHOLDERS = (-200, -3, VOCAB, VOCAB + 7)


def test_masked_placeholder_targets_leave_the_loss_and_gradients_as_they_were():
    logits = jax.random.normal(jax.random.key(1), (ROWS, LENGTH, VOCAB))
    _, _, _, targets, mask = head("lm_head")

    def loss_and_grad(t):
        return jax.value_and_grad(lambda x: masked_cross_entropy(x, t, mask)[0])(logits)

    want, want_grad = loss_and_grad(targets)
    assert np.isfinite(float(want))
    for placeholder in PLACEHOLDERS:
        got, got_grad = loss_and_grad(jnp.where(mask, targets, placeholder))
        assert float(got) == float(want), placeholder
        np.testing.assert_array_equal(got_grad, want_grad, err_msg=str(placeholder))
    # The zero logits of the report: NaN there before.
    loss, count = masked_cross_entropy(jnp.zeros((1, 4, 10)), jnp.array([[1, 2, 10, 3]]),
                                       jnp.array([[1.0, 1.0, 0.0, 1.0]]))
    assert float(count) == 3 and float(loss) == pytest.approx(np.log(10))


@pytest.mark.parametrize("chunk", [0, 5], ids=["plain", "chunked"])
@pytest.mark.parametrize("kind", ["lm_head", "tied"])
def test_decoder_nll_with_masked_placeholder_targets(kind, chunk):
    """Both of Decoder.loss's paths: a placeholder target is NaN on its own, and under its zero mask changes
    neither the masked mean nor any gradient."""
    decoder, params, h, targets, mask = head(kind)
    want_nll, want_grads = nll_and_grads(decoder, params, h, targets, mask, chunk)
    for placeholder in PLACEHOLDERS:
        got_nll, got_grads = nll_and_grads(decoder, params, h, jnp.where(mask, targets, placeholder), mask, chunk)
        np.testing.assert_array_equal(jnp.isnan(got_nll), ~mask)
        np.testing.assert_array_equal(got_nll[mask], want_nll[mask])
        assert float(masked_mean(got_nll, mask)[0]) == float(masked_mean(want_nll, mask)[0])
        for want, got in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
            assert bool(jnp.isfinite(got).all()), placeholder
            np.testing.assert_array_equal(got, want, err_msg=str(placeholder))


def test_embedding_clips_ids_outside_the_table():
    """Negative ids read the first row (not wrapping from the end), ids past the vocabulary the last."""
    decoder, params, _, _, _ = head("tied")
    ids = jnp.array([[5, *PLACEHOLDERS]])
    rows = decoder.apply({"params": params}, ids, method=Decoder.embed)
    table = params["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(rows[0], table[jnp.array([5, 0, 0, VOCAB - 1, VOCAB - 1])])
