import json

import jax
import numpy as np
import pytest

from configs.base import get_config
from vlm_jax import parallel
from vlm_jax.checkpoints.directory import write_checkpoint_dir
from vlm_jax.interop.hf_export import export_checkpoint
from vlm_jax.soup import check_compatible, load_params, soup
from vlm_jax.train import loop
from tests.helpers import tiny_config

MESH = parallel.make_mesh(get_config().mesh)


def test_soup_of_itself_is_identity_weighted_soup_averages_and_result_loads_and_exports(tmp_path):
    # LLaVA-shaped connector (no input LayerNorm) so the soup exports as an HF LLaVA.
    config = tiny_config("total_steps=1", "checkpoint_every=1", "model.connector.in_norm=False")
    run = str(tmp_path / "run")
    loop.train(config, run)
    trained, meta = load_params(run, MESH)

    soup([run, run], str(tmp_path / "self"), MESH)
    same, _ = load_params(str(tmp_path / "self"), MESH)
    assert set(same) == set(trained)
    for k in trained:
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(trained[k]), err_msg=k)

    shifted = {k: v + 1.0 for k, v in trained.items()}
    write_checkpoint_dir(str(tmp_path / "shifted"), shifted, meta)
    soup([run, str(tmp_path / "shifted")], str(tmp_path / "mix"), MESH, weights=[1, 3])
    mix, _ = load_params(str(tmp_path / "mix"), MESH)
    for k in trained:
        np.testing.assert_allclose(np.asarray(mix[k]), np.asarray(trained[k]) + 0.75, atol=1e-6, err_msg=k)

    # The soup starts a run (what --config.init_params does) and exports like any checkpoint directory.
    config.init_params = str(tmp_path / "mix")
    started = loop.Setup(config).imported_state(config.init_params)
    np.testing.assert_array_equal(np.asarray(started.params["decoder"]["final_norm"]["scale"]),
                                  np.asarray(mix["decoder/final_norm/scale"]))
    export_checkpoint(str(tmp_path / "mix"), str(tmp_path / "hf"), "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    export_checkpoint(run, str(tmp_path / "hf_run"), "hf")  # a training workdir exports too
    assert (tmp_path / "hf_run" / "model.safetensors").stat().st_size > 0



def test_soup_refuses_sources_of_another_structure_naming_each_difference():
    first = {"a": jax.ShapeDtypeStruct((2, 3), np.float32), "b": jax.ShapeDtypeStruct((4,), np.float32)}
    other = {"a": jax.ShapeDtypeStruct((3, 3), np.float32), "c": jax.ShapeDtypeStruct((4,), np.float32)}
    wanted = r"(?s)OTHER.*missing b.*unexpected c.*a: float32\[3, 3\], expected float32\[2, 3\]"
    with pytest.raises(ValueError, match=wanted):
        check_compatible(first, other, "OTHER")
    with pytest.raises(ValueError, match="weights"):
        soup(["x", "y"], "never", MESH, weights=[1.0])
