"""Tensor parallelism with transformers' own loader: 2 CPU processes (gloo), the MLPs sharded, logits unchanged."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model


WORKER = """
import json, os, torch
from transformers import DistributedConfig
from modeling_parcae import ParcaeForCausalLM
model = ParcaeForCausalLM.from_pretrained({model!r}, distributed_config=DistributedConfig(tp_plan="auto")).eval()
with torch.no_grad():
    logits = model(torch.tensor({ids}), num_loops=3).logits
weight = model.model.core[0].mlp.up_proj.weight
rank = int(os.environ["RANK"])
# one file per rank: two ranks printing long lines to one stdout can interleave them
with open(f"rank{{rank}}.json", "w") as report:
    json.dump({{"rank": rank, "sharded": type(weight).__name__, "local_rows": weight.to_local().shape[0],
               "logits": logits.tolist()}}, report)
"""


def test_tp_plan_shards_on_two_cpu_processes_with_identical_logits(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    ids = [[5, 17, 99, 3, 250, 42, 7]]
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(torch.tensor(ids), num_loops=3).logits
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(model=str(tmp_path / "model"), ids=ids)))
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", str(script)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(out["rank"] for out in outputs) == [0, 1]
    for out in outputs:
        assert out["sharded"] == "DTensor"
        assert out["local_rows"] == model.config.core_intermediate_size // 2  # each rank holds half the MLP
        torch.testing.assert_close(torch.tensor(out["logits"]), expected, atol=1e-5, rtol=1e-5)
