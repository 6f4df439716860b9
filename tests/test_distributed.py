"""DDP, FSDP2 (DTensor) and distributed checkpoints with 2 processes on CPU (gloo).

One launch of ``tests/dist_worker.py`` on 2 ranks runs every scenario (process start-up dominates on a
2-core machine, so it is paid once); the tests below check its results. The ranks rendezvous through a
file store in a temporary folder (no fixed port), run with one thread each, and are killed if they are
not done within ``LAUNCH_TIMEOUT_S``.

Tolerances, and why:

- ``FLOAT_TOL`` (1e-5 absolute on parameters of scale ~0.1-1, observed <= 3.1e-7): DDP and FSDP2 average
  gradients over the ranks in another summation order than one process, nothing else differs. This
  holds for quantized states too when every shard starts on a block boundary (here: 4-bit blocks of 128,
  rank 1's shards start at elements 3072, 6144 and 2432), because stochastic rounding draws the number
  of each element's global position.
- 8-bit moments of the 37x128 layer: rank 1's shard starts at element 2432, mid-way through a block of
  256, so its blocks (scales) differ from one process's and the states round differently. The runs then
  differ by quantization error, which perturbs every layer through the loss: bounded by one step's size
  ``LR`` (observed LR / 4) and the final losses agree to 1 %.
- Lion: the update is a sign, so an element whose momentum-gradient mix is within float error of 0 can
  move 2 lr the other way; bounded by 2 lr per step and < 1 % of the elements (observed 0.03 %).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),  # fmt: skip
]

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT_S = 240
FLOAT_TOL = 1e-5
LR, STEPS = 3e-3, 6  # as in dist_worker.py


def launch(out: Path, world: int = 2, timeout: float = LAUNCH_TIMEOUT_S, worker: Path = WORKER) -> dict:
    """Run ``world`` ranks of ``worker`` (default ``dist_worker.py``; run as ``python worker RANK WORLD STORE
    OUT``, rank 0 writes ``OUT/results.json``); their results, or an error with the tail of their logs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on the host name resolving
    logs = [open(out / f"rank{r}.log", "w") for r in range(world)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(out / "store"), str(out)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(world)]  # fmt: skip
    deadline, timed_out = time.monotonic() + timeout, False
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for f in logs:
            f.close()
    result = out / "results.json"
    if timed_out or not result.exists() or any(p.returncode for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n" + (out / f"rank{r}.log").read_text()[-3000:]
                          for r, p in enumerate(procs))  # fmt: skip
        raise RuntimeError(f"distributed worker {'timed out' if timed_out else 'failed'}:\n{tails}")
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("dist"))


def scenario(dist_results, name: str) -> dict:
    res = dist_results["results"][name]
    if set(res) == {"error"}:
        pytest.fail(f"scenario {name} raised:\n{res['error']}")
    return res


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("key", ["qadamw8", "qadamw4", "hybrid_adam", "lowrank_adam"])
def test_ddp_matches_single_process(dist_results, key):
    res = scenario(dist_results, f"ddp/{key}")
    assert res["ranks_identical"]
    assert res["vs_ref"]["max_abs"] < FLOAT_TOL, res["vs_ref"]
    assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-5)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("key", ["qadamw4", "hybrid_adam", "hybrid_lowrank", "sgd8"])
def test_fsdp2_matches_single_process(dist_results, key):
    res = scenario(dist_results, f"fsdp/{key}")
    tol = 1e-2 * 3e-2 if key == "sgd8" else FLOAT_TOL  # sgd8: the 37x128 layer's 8-bit blocks differ (see top)
    assert res["vs_ref"]["max_abs"] < tol, res["vs_ref"]
    assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-4)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_8bit_with_shards_starting_mid_block_stays_within_quantization_error(dist_results):
    res = scenario(dist_results, "fsdp/qadamw8")
    assert res["vs_ref"]["max_abs"] < LR, res["vs_ref"]
    assert res["losses"][-1] == pytest.approx(res["ref_losses"][-1], rel=1e-2)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_lion_differs_only_by_sign_flips(dist_results):
    res = scenario(dist_results, "fsdp/lion8")
    assert res["vs_ref"]["max_abs"] <= 2 * 3e-4 * STEPS + 1e-6
    assert res["vs_ref"]["frac_differ"] < 0.01, res["vs_ref"]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_adafactor_uses_global_statistics(dist_results):
    # the factored v's row mean and the update clipping's RMS are reductions over the sharded matrix
    res = scenario(dist_results, "fsdp/adafactor")
    assert res["vs_ref"]["max_abs"] < FLOAT_TOL, res["vs_ref"]
    assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-4)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_lowrank_adam_on_fsdp2_refuses_sharded_lowrank_parameters_clearly(dist_results):
    err = dist_results["results"]["fsdp/lowrank_adam"]["error"]
    assert "NotImplementedError" in err and "hybrid_adam" in err and "sharded" in err


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_decides_compression_on_the_global_shape_and_stores_local_shards(dist_results):
    q = scenario(dist_results, "fsdp/qadamw8")
    # 96x64 = 6144 elements >= 4096, though each rank holds 48x64 = 3072 < 4096: quantized, per shard
    st, ref = q["states"]["0.weight"], q["ref_states"]["0.weight"]
    assert st["exp_avg.codes"] == ["Tensor", [3072]] and ref["exp_avg.codes"] == ["Tensor", [6144]]
    assert st["exp_avg.scales"] == ["Tensor", [12]]
    # uneven shards: 37 rows -> 19 on rank 0 (whose results these are)
    assert q["states"]["4.weight"]["exp_avg_sq.codes"] == ["Tensor", [19 * 128]]
    # small tensors: dense DTensor moments with the parameter's sharding
    assert q["states"]["6.weight"]["exp_avg"] == ["DTensor", [4, 37]]
    h = scenario(dist_results, "fsdp/hybrid_adam")["states"]["2.weight"]  # 128 x 96: rows sharded
    assert h["exp_avg_sq.row"] == ["DTensor", [64]] and h["exp_avg_sq.col"] == ["DTensor", [96]]
    lr = scenario(dist_results, "fsdp/hybrid_lowrank")["states"]
    assert lr["2.weight"]["exp_avg.v"] == ["DTensor", [64, 4]]  # 128 x 96: d0 the long side, V row-sharded
    assert lr["2.weight"]["exp_avg.u"] == ["DTensor", [96, 4]]  # U replicated
    assert lr["0.weight"]["exp_avg.v"] == ["DTensor", [48, 4]]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(dist_results):
    res = scenario(dist_results, "fsdp/nonfinite")
    assert res["skipped"] == [1, 1]
    assert res["unchanged"]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("key", ["qadamw4", "hybrid_lowrank"])
def test_dcp_save_load_resumes_the_same_trajectory(dist_results, key):
    res = scenario(dist_results, f"dcp/{key}")
    assert res["loaded_params_diff"] == 0.0
    assert res["resume_diff"] == 0.0  # bit-identical on CPU
    assert res["losses_a"] == res["losses_b"]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_dcp_checkpoint_into_another_world_size(dist_results):
    # quantized states (blocked per shard) are refused, naming the parameter and the reason
    err = scenario(dist_results, "world1/qadamw4")
    assert not err["loaded"]
    assert "'0.weight'" in err["error"] and "same world size" in err["error"] and "(2, 1536)" in err["error"]
    # plain DCP refuses it too, naming the state
    raw = dist_results["results"]["world1/raw_dcp_error"]
    assert "Size mismatch" in raw and "optim.state.0.weight.exp_avg.codes" in raw
    # factored + low-rank states reshard: the 2-rank checkpoint continues in one process
    ok = scenario(dist_results, "world1/hybrid_lowrank")
    assert ok["loaded"], ok
    assert ok["continue_diff"] < FLOAT_TOL


def test_fsdp2_budget_plans_agree_across_ranks_and_fit_the_budget(dist_results):
    res = scenario(dist_results, "fsdp/budget")
    assert res["plans_agree"], "every rank must plan the same codecs"
    assert res["measured"], "the dynamic allocator measured its candidates"
    assert max(res["totals"]) <= res["limit"], "the states of all ranks together exceed the budget"
    assert all(math.isfinite(v) for v in res["losses"])
