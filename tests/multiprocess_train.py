"""One process of a multi-process training run for tests/test_multiprocess.py (`python -m tests.multiprocess_train`
from the repository root): vlm-train's command line (--config, --workdir, --coordinator_address, --num_processes,
--process_id, --config.KEY=VALUE). Process 0 also writes a digest of every step's global batch to
WORKDIR/batch_digests.json and the parameters the run ended with, gathered from every process, to
WORKDIR/final_params.npz."""

import hashlib
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vlm_jax import parallel
from vlm_jax.cli.args import parse
from vlm_jax.train.loop import train


def batch_digest(batch: dict) -> str:
    """sha256 of every array of a global batch, in key order (a collective when there are several processes)."""
    digest = hashlib.sha256()
    for k in sorted(batch):
        digest.update(k.encode())
        digest.update(np.ascontiguousarray(multihost_utils.process_allgather(batch[k], tiled=True)).data)
    return digest.hexdigest()


def recording_global_batch(digests: list[str]) -> Callable:
    """`parallel.global_batch` that also appends each batch's digest to `digests`."""
    original = parallel.global_batch

    def global_batch(batch: dict, mesh) -> dict:
        out = original(batch, mesh)
        digests.append(batch_digest(out))
        return out
    return global_batch


def main() -> None:
    args, config = parse(__doc__.splitlines()[0])
    assert jax.process_count() > 1, "the test runs several processes"
    digests = []
    parallel.global_batch = recording_global_batch(digests)
    state = train(config, args.workdir)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "batch_digests.json"), "w") as f:
            json.dump(digests, f)
        np.savez(os.path.join(args.workdir, "final_params.npz"), **traverse_util.flatten_dict(params, sep="/"))


if __name__ == "__main__":
    main()
