"""Stage 0: supervised pretraining of the vision tower on dense per-patch labels.

Every real system starts from a pretrained tower (CLIP, EVA, Qwen-VL: `vlm-convert import`). The demo
has none, and a ViT trained from scratch through the LLM loss alone learns colour but loses the shape
information it starts with (docs/experiments.md 1). This stage stands in for the pretrained tower: it trains
the configured ViT alone, with one linear head per label set on every output patch token, on labels the
synthetic source derives from its scene geometry (`synthetic.patch_labels`), and saves `{'vision': params}`
as a params-only checkpoint that the VLM stage starts from (and, by the usual `optim.trainable` rules, freezes).

Tiled stems (clip, qwenvl) learn on the views the VLM sees: the global view (the whole image in one
`data.tile_size` tile) and, a `vision_pretrain.tile_fraction` of the time, one of its tiles. The navit stem learns
on native-resolution images packed into `data.max_patches_per_row` slots, as in VLM training, with one label per
merge window (the heads see its patches side by side), the unit the PatchMerger hands the LLM.
"""

import json
import logging
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlm_jax import parallel
from vlm_jax.checkpoints.params_only import save_params
from vlm_jax.data import synthetic
from vlm_jax.data.images import choose_grid, global_view, tile_image
from vlm_jax.data.navit import navit_patches, pack_patches
from vlm_jax.errors import DivergedError
from vlm_jax.layers import axes
from vlm_jax.layers.dense import Dense
from vlm_jax.layers.options import ModuleOptions
from vlm_jax.train.metrics import MetricsLogger
from vlm_jax.vision.vit import ViT

IGNORE = -1  # label of padding patch slots
CLASSES = {name: len(values) + 1 for name, values in synthetic.LABEL_SETS.items()}  # + "no shape"
NONE = {name: len(values) for name, values in synthetic.LABEL_SETS.items()}
INPUTS = {"clip": ("pixels",), "qwenvl": ("pixels",), "navit": ("patches", "patch_positions", "patch_segment_ids")}


class DenseLabeler(nn.Module):
    """The model's vision tower (named `vision`, as in VLM) with a linear head per label set on each token."""

    config: ml_collections.ConfigDict  # config.model

    @nn.compact
    def __call__(self, *inputs: jax.Array) -> dict[str, jax.Array]:
        c = self.config
        options = ModuleOptions.from_config(c)
        x = ViT(c.vision, options, name="vision")(*inputs)
        g = _window(c) ** 2
        # Labelled per merge window, the unit the PatchMerger hands the LLM: one 8 px patch shows a fragment
        # of a shape, its window (the heads see the window's patches side by side) most of one.
        x = x.reshape(*x.shape[:-2], x.shape[-2] // g, g * x.shape[-1])
        return {name: Dense(n, (axes.EMBED, None), use_bias=True, name=f"{name}_head",
                            **options.dtypes)(x) for name, n in CLASSES.items()}


class LabelledBatches:
    """Deterministic batches of one split: model inputs plus `labels_<set>` per output token; row r of batch s
    draws its images from (seed, split, s, r) alone, so each process builds only its own rows."""

    def __init__(self, config: ml_collections.ConfigDict, split: str, size: int):
        d, v = config.data, config.model.vision
        if d.source != "synthetic":
            raise ValueError(f"vision_pretrain needs dense patch labels, which only the synthetic source has "
                             f"(data.source={d.source!r}); real runs start from an imported tower instead "
                             "(vlm-convert import, then --config.init_params)")
        if v.stem not in INPUTS:
            raise ValueError(f"vision_pretrain supports the stems {sorted(INPUTS)}, not {v.stem!r}")
        self.config, self.split = config, split
        self.source = synthetic.SyntheticSource(split, size, config.seed, d.min_image_size, d.max_image_size)

    def image(self, index: int):
        return self.source[index]["images"][0], self.source.scene(index)

    def view(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One tiled view: the global view, or with probability `vision_pretrain.tile_fraction` one of the
        image's tiles (any but a 1x1 grid's), labelled over the part of the image it shows."""
        c = self.config
        d, grid = c.data, c.model.vision.image_size // c.model.vision.patch_size
        img, scene = self.image(int(rng.integers(len(self.source))))
        a, b = choose_grid(img.width, img.height, d.tile_size, d.max_tiles)
        if a * b == 1 or rng.random() >= c.vision_pretrain.tile_fraction:
            pixels, box = global_view(img, d.tile_size), None
        else:
            k = int(rng.integers(a * b))
            pixels = tile_image(img, d.tile_size, d.max_tiles, d.swap_hw)[1 + k]
            # Whatever the grid's orientation (data/images.py), tile k is row-major in the resized image,
            # which spans the whole original image.
            rows, cols = (a, b) if d.swap_hw else (b, a)
            i, j = divmod(k, cols)
            box = (j * img.width / cols, i * img.height / rows, (j + 1) * img.width / cols,
                   (i + 1) * img.height / rows)
        labels = synthetic.patch_labels(scene, grid, grid, box)
        if box is not None:  # a tile alone cannot tell where in the image it is
            labels["quadrant"] = np.full_like(labels["quadrant"], IGNORE)
        return {"pixels": pixels, **{f"labels_{k}": v for k, v in labels.items()}}

    def row(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.config
        v = c.model.vision
        if v.stem != "navit":
            return self.view(rng)
        m, cap = c.model.connector.merge_size, c.data.max_patches_per_row
        if cap % (m * m):
            raise ValueError(f"data.max_patches_per_row={cap} is not a whole number of {m}x{m} merge windows")
        images, labels, used = [], [], 0
        while len(images) < c.data.max_images_per_row:
            img, scene = self.image(int(rng.integers(len(self.source))))
            patches, grid = navit_patches(img, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                          merge_size=m, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels)
            if used + len(patches) > cap:
                if not images:
                    raise ValueError(f"a {img.width}x{img.height} image has {len(patches)} patches, more than "
                                     f"data.max_patches_per_row={cap}")
                break
            images.append((patches, grid))
            used += len(patches)
            _, h, w = grid
            # One label per merge window; windows come in raster order (data/navit.py).
            labels.append(synthetic.patch_labels(scene, h // m, w // m))
        row = pack_patches(images, cap, images[0][0].shape[1], m)
        for k in CLASSES:
            row[f"labels_{k}"] = np.full(cap // (m * m), IGNORE, np.int32)
            row[f"labels_{k}"][:used // (m * m)] = np.concatenate([x[k] for x in labels])
        return row

    def batch(self, step: int, rows: int, process: int = 0, processes: int = 1) -> dict[str, np.ndarray]:
        """This process's share of the `rows` rows of batch `step`."""
        per = rows // processes
        built = [self.row(np.random.default_rng([self.config.seed, synthetic.SPLITS[self.split], step, r]))
                 for r in range(process * per, (process + 1) * per)]
        return {k: np.stack([b[k] for b in built]) for k in built[0]}


def _window(model_config: ml_collections.ConfigDict) -> int:
    """Side of the window whose tokens get one label: the merge window of a navit tower, else 1 (each token)."""
    return model_config.connector.merge_size if model_config.vision.stem == "navit" else 1


def _logits_and_labels(model: DenseLabeler, params, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    stem = model.config.vision.stem
    out = model.apply({"params": params}, *(batch[k] for k in INPUTS[stem]))
    # A kept class token comes first; labels cover the patch tokens after it.
    return {k: (logits[:, logits.shape[1] - batch[f"labels_{k}"].shape[1]:], batch[f"labels_{k}"])
            for k, logits in out.items()}


def _loss_and_metrics(model: DenseLabeler, params, batch: dict):
    loss, metrics = 0.0, {}
    for k, (logits, labels) in _logits_and_labels(model, params, batch).items():
        valid = labels != IGNORE
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
        loss += (nll * valid).sum() / jnp.maximum(valid.sum(), 1)
        # Accuracy where a shape is: "no shape" is most patches of a fine grid and would flatter the figure.
        held = valid & (labels != NONE[k])
        metrics[f"{k}_hits"] = ((logits.argmax(-1) == labels) & held).sum()
        metrics[f"{k}_held"] = held.sum()
    return loss, metrics


def pretrain_vision(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs stage 0 into `workdir` (nothing to do when its `params` are already there, e.g. a resumed run) and
    returns `workdir`, a params-only checkpoint directory for `init_params`. An interrupted stage 0 restarts."""
    if os.path.isdir(os.path.join(workdir, "params")):
        logging.info("vision pretraining: using %s/params", workdir)
        return workdir
    vp = config.vision_pretrain
    mesh = parallel.make_mesh(config.mesh)
    if vp.batch_size % parallel.data_parallel_size(mesh) or vp.batch_size % jax.process_count():
        raise ValueError(f"vision_pretrain.batch_size {vp.batch_size} must divide by the data x fsdp mesh size "
                         f"{parallel.data_parallel_size(mesh)} and the process count {jax.process_count()}")
    os.makedirs(workdir, exist_ok=True)
    model = DenseLabeler(config.model)
    train = LabelledBatches(config, "train", config.data.num_train)

    def local_rows(src: LabelledBatches, s: int) -> dict[str, np.ndarray]:
        return src.batch(s, vp.batch_size, jax.process_index(), jax.process_count())

    inputs = [jnp.asarray(v) for k, v in train.batch(0, 1).items() if not k.startswith("labels_")]
    init = lambda key: model.init(key, *inputs)["params"]  # noqa: E731
    shardings = parallel.logical_shardings(jax.eval_shape(init, jax.random.key(config.seed)), mesh)
    schedule = optax.warmup_cosine_decay_schedule(0.0, vp.lr, min(vp.warmup_steps, vp.steps - 1), vp.steps,
                                                  vp.lr * vp.final_lr_ratio)
    optimizer = optax.chain(optax.clip_by_global_norm(config.optim.clip_norm),
                            optax.adamw(schedule, weight_decay=vp.weight_decay))

    def train_step(params, opt_state, batch):
        with nn.logical_axis_rules(parallel.LOGICAL_RULES):
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: _loss_and_metrics(model, p, batch), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}

    def eval_step(params, batch):
        with nn.logical_axis_rules(parallel.LOGICAL_RULES):
            return _loss_and_metrics(model, params, batch)[1]

    with jax.set_mesh(mesh):
        params = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=nn.meta.unbox(shardings))(
            jax.random.key(config.seed))
        opt_state = jax.jit(optimizer.init)(params)
        train_step, eval_step = jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)
        logger = MetricsLogger(workdir, 0, vp.steps)
        labelled = 0.0
        for s in range(1, vp.steps + 1):
            local = local_rows(train, s)
            labelled += float(np.count_nonzero(local["labels_shape"] != IGNORE) * jax.process_count())
            params, opt_state, metrics = train_step(params, opt_state, parallel.global_batch(local, mesh))
            logger.advance()
            if s % config.log_every == 0 or s == vp.steps:
                m = jax.device_get(metrics)
                record = logger.log(s, {"loss": m["loss"], **_accuracies(m)}, labelled)
                if not math.isfinite(record["loss"]):
                    raise DivergedError(f"vision pretraining loss is {record['loss']} at step {s}")
        logger.close()
        held_out = LabelledBatches(config, "eval", config.data.num_eval)
        totals: dict[str, float] = {}
        for s in range(max(1, vp.eval_images // vp.batch_size)):
            metrics = jax.device_get(eval_step(params, parallel.global_batch(local_rows(held_out, s), mesh)))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    result = {"step": vp.steps, **_accuracies(totals)}
    logging.info("vision pretraining, held-out patch accuracy: %s", result)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            f.write(json.dumps(result) + "\n")
    save_params(os.path.join(workdir, "params"), {"vision": params["vision"]})
    return workdir


def _accuracies(sums: dict) -> dict[str, float]:
    return {f"{k}_accuracy": float(sums[f"{k}_hits"]) / max(float(sums[f"{k}_held"]), 1.0) for k in CLASSES}
