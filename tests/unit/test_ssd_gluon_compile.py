"""The Gluon SSD backwards (`ssd_gluon_bwd.py` for groups < heads, `ssd_gluon_head_bwd.py` for groups = heads;
Hopper only) and the Gluon walks (`ssd_gluon_fwd.py` forward, `ssd_gluon_state_bwd.py` reverse state pass) compiled for sm_90 here, without a GPU (ptxas and
cuobjdump ship in the Triton wheel): every shape it accepts must fit the H200's shared memory per block and be
warp-specialised (producer and consumer register counts set by setmaxnreg). Its numbers are checked on the H200
by tests/gpu/test_ssd_kernel_gpu.py; this catches, in CI, a change that would no longer launch (one more ring
stage, a layout conversion needing scratch). Runs bench/ssd_gluon_compile.py in a subprocess: the test session
sets TRITON_INTERPRET=1 (tests/conftest.py), under which Gluon cannot compile."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
H200_SHARED_MEMORY_PER_BLOCK = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on the H200


def test_gluon_backward_compiles_for_sm90_within_shared_memory():
    pytest.importorskip("triton.experimental.gluon")
    from cheems_parallel.kernels import ssd_gluon_bwd, ssd_gluon_head_bwd

    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ssd_gluon_compile.py")], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kernels = [row.get("kernel", "group") for row in rows]
    # the head and forward kernels also in their PROFILE builds (the cycle-profile scripts in bench/)
    assert kernels.count("group") == 4 and kernels.count("head") == 5, result.stdout[-3000:]
    assert kernels.count("forward") == 5 and kernels.count("state") == 4, result.stdout[-3000:]
    for row in rows:
        assert "error" not in row, row
        report = row["report"]
        assert report["smem"] <= H200_SHARED_MEMORY_PER_BLOCK, row
        assert report["hgmma"] > 0, row
        if row.get("kernel") in ("forward", "state"):
            # the walks are not warp-specialised: p / 16 warps, one program per SM, and they must not spill
            # (the forward's state, y and scores accumulators fill the register file)
            assert report["stack"] == 0 and report["stl"] == 0, row
        else:
            consumer = (ssd_gluon_head_bwd.B_SIDE_REGISTERS if row.get("kernel") == "head"
                        else ssd_gluon_bwd.CONSUMER_REGISTERS)
            assert {ssd_gluon_bwd.PRODUCER_REGISTERS, consumer} <= set(report["setmaxnreg"]), row


def test_gluon_forward_walks_only_with_enough_sequences():
    """The forward walk runs one program per (batch, head) sequence: by default it needs at least 3/8 of the SMs'
    worth of them (else the chunk-parallel Triton forward runs); gluon_fwd_min_sequences overrides the bound."""
    pytest.importorskip("triton.experimental.gluon")
    from cheems_parallel.kernels.ssd_gluon_fwd import enough_sequences

    assert not enough_sequences(32, 132) and not enough_sequences(48, 132)   # measured slower at 32 on the H200
    assert enough_sequences(64, 132)              # cheems-320m: micro-batch 8 x 8 heads (measured faster)
    assert enough_sequences(128, 132)             # bench/ssd.py at L = 16k: 4 x 32
    assert enough_sequences(1, 132, minimum=1) and not enough_sequences(3, 132, minimum=4)


def test_gluon_state_walk_runs_only_with_enough_sequences():
    """The reverse state walk runs one program per (batch, head) sequence: by default it needs half the SMs' worth
    of them (measured at par with the Triton kernel at 64 on the H200's 132 SMs, faster from 128);
    gluon_state_bwd_min_sequences overrides the bound."""
    pytest.importorskip("triton.experimental.gluon")
    from cheems_parallel.kernels.ssd_gluon_state_bwd import enough_sequences

    assert not enough_sequences(64, 132) and enough_sequences(66, 132)
    assert enough_sequences(128, 132)             # bench/ssd.py at L = 16k: 4 x 32
    assert enough_sequences(1, 132, minimum=1) and not enough_sequences(3, 132, minimum=4)
