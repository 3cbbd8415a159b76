"""Compile a Triton or Gluon kernel source for the H200 (sm_90) on a machine without a GPU and read what the
hardware would get: registers at launch, stack bytes (spills), local loads/stores, shared memory, wgmma count
(HGMMA) and the setmaxnreg values. ptxas and cuobjdump ship in the Triton wheel. Used by `bench/ssd.py
--compile-report` and `bench/dmattn_gluon_compile.py`."""
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def compile_sm90(source, options):
    """(report dict, SASS text) of `source` (an ASTSource / GluonASTSource) compiled with `options`."""
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", handle.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", handle.name], capture_output=True, text=True).stdout
    setmaxnreg = sorted({int(value, 16) for value in re.findall(r"USETMAXREG\.\S+ (?:UP0, )?(0x[0-9a-f]+)", sass)})
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)), "smem": compiled.metadata.shared,
            "hgmma": sass.count("HGMMA"), "stl": len(re.findall(r"\bSTL", sass)),
            "ldl": len(re.findall(r"\bLDL", sass)), "setmaxnreg": setmaxnreg,
            "sass_lines": len(sass.splitlines())}, sass
