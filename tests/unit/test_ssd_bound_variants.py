"""bench/ssd_bound_variants.py edits copies of the shipped Gluon SSD kernels by exact lines. If a kernel changes, the
script must refuse rather than write a variant that times something else; while the kernels are as they are, each
variant must differ from them only where its description says, and still be valid Python."""
import ast
import difflib
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
KERNELS = os.path.join("cheems_parallel", "kernels")


def changed_lines(shipped_name, variant_path):
    with open(os.path.join(ROOT, KERNELS, shipped_name)) as handle:
        shipped = handle.read().splitlines()
    with open(variant_path) as handle:
        variant = handle.read()
    ast.parse(variant)
    diff = difflib.unified_diff(shipped, variant.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_variants_change_only_the_state_and_rotated_traffic(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ssd_bound_variants.py"), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    folder = {name: tmp_path / f".ab_{name}" / KERNELS for name in ("half", "none", "none_norot")}

    forward = changed_lines("ssd_gluon_fwd.py", folder["half"] / "ssd_gluon_fwd.py")
    assert forward == ["-        if STORE_STATES:", "+        if STORE_STATES and (c % 2 == 1):"]
    norot = changed_lines("ssd_gluon_fwd.py", folder["none_norot"] / "ssd_gluon_fwd.py")
    assert "+        if STORE_STATES and (False):" in norot and "+        if SAVE_ROTATED and False:" in norot
    assert len(norot) == 4

    head = changed_lines("ssd_gluon_head_bwd.py", folder["none"] / "ssd_gluon_head_bwd.py")
    assert sum(line.startswith("-") for line in head) == 4 and head[-1] == "+        mbarrier.arrive(sg_ready, count=1)"
    group = changed_lines("ssd_gluon_bwd.py", folder["none"] / "ssd_gluon_bwd.py")
    removed = [line for line in group if line.startswith("-")]
    assert all("s_desc" in line for line in removed) and len(removed) == 3   # the two state loads and their bytes
    assert not (folder["half"] / "ssd_gluon_bwd.py").exists()   # `half` leaves the group backward as shipped

    state_walk = changed_lines("ssd_gluon_state_bwd.py", folder["half"] / "ssd_gluon_state_bwd.py")
    assert state_walk[0].startswith("-") and "+        if c % 2 == 1:" in state_walk and len(state_walk) == 3


def test_a_kernel_without_the_edited_lines_is_refused(tmp_path):
    """A kernel whose state store was rewritten must stop the script with a one-line error naming the file, not yield
    a variant that silently times the unedited kernel."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import ssd_bound_variants as variants
    finally:
        sys.path.pop(0)
    kernel = tmp_path / "ssd_gluon_fwd.py"
    with open(os.path.join(ROOT, KERNELS, "ssd_gluon_fwd.py")) as handle:
        kernel.write_text(handle.read().replace("if STORE_STATES:\n", "if STORE_STATES and True:\n"))
    try:
        variants.edited(str(kernel), [(variants.FWD_STATE_STORE, "")])
    except SystemExit as stop:
        message = str(stop.code)
    else:
        raise AssertionError("the edit applied to a kernel without its lines")
    assert str(kernel) in message and "if STORE_STATES:" in message and "\n" not in message
