"""Timing-only variants of the Gluon SSD kernels that move fewer bytes than a correct kernel can: upper bounds on
what a byte-cutting redesign could save (bench/ssd_notes.md, "v27"). Their results are WRONG by construction;
they exist to be timed against this tree by bench/gpu_ssd_ab.sh, never to be used.

  python bench/ssd_bound_variants.py            # writes .ab_half/, .ab_none/, .ab_none_norot/ (ignored folders)
  SKIP_MAMBA=--skip-mamba bash bench/gpu_ssd_ab.sh .ab_none 4096      # on the GPU, carry the folder

  half         chunk states every 128 tokens: the forward walk stores S only at even slots, the state walk G only
               at odd chunks, and each head-backward tile reads one 32 KB state instead of two (the products that
               would form the missing states are not done)
  none         no chunk state goes through memory at all (no S or G stores; neither backward, head or group,
               reads them)
  none_norot   none, and the forward walk does not store B~ and C~ either (the backward reads stale buffers)
"""
import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KERNELS = "cheems_parallel/kernels/"

FWD_STATE_STORE = ("        if STORE_STATES:\n"
                   "            tma.async_copy_shared_to_global(s_desc, [state_row + H * P, 0], s_smem)")
FWD_ROTATED_STORE = "        if SAVE_ROTATED:"
STATE_WALK_STORE = "        tma.async_copy_shared_to_global(ds_desc, [((bi * (NCHUNK + 1) + c) * H + hi) * P, 0], out)"
HEAD_STATE_LOADS = """        mbarrier.expect(sg_ready, 2 * s_desc.block_type.nbytes)
        state_row = ((bi * (NCHUNK + 1) + c) * H + hi) * P
        tma.async_copy_global_to_shared(s_desc, [state_row, 0], sg_ready, s_smem)
        tma.async_copy_global_to_shared(ds_desc, [state_row, 0], sg_ready, ds_smem)
"""
HEAD_ONE_STATE = """        state_row = ((bi * (NCHUNK + 1) + c) * H + hi) * P
        mbarrier.expect(sg_ready, s_desc.block_type.nbytes)
        if c % 2 == 0:
            tma.async_copy_global_to_shared(s_desc, [state_row, 0], sg_ready, s_smem)
        else:
            tma.async_copy_global_to_shared(ds_desc, [state_row, 0], sg_ready, ds_smem)
"""
HEAD_NO_STATE = "        mbarrier.arrive(sg_ready, count=1)\n"
GROUP_STATE_BYTES = "        mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + 2 * s_desc.block_type.nbytes)\n"
GROUP_STATE_LOADS = ("        tma.async_copy_global_to_shared(s_desc, [state_row0 + head * P, 0], bar, "
                     "s_smem.index(slot))\n"
                     "        tma.async_copy_global_to_shared(ds_desc, [state_row0 + head * P, 0], bar, "
                     "ds_smem.index(slot))\n")


def edited(path, replacements):
    text = open(os.path.join(ROOT, path)).read()
    for old, new in replacements:
        if text.count(old) != 1:   # the kernels changed: the variant would silently time something else
            sys.exit(f"{path}: expected one occurrence of {old.splitlines()[0].strip()!r}")
        text = text.replace(old, new)
    return text


def variant(out, name, state_condition, head_loads, store_rotated=True, group_reads_states=True):
    fwd = [(FWD_STATE_STORE, FWD_STATE_STORE.replace("if STORE_STATES:", f"if STORE_STATES and ({state_condition}):"))]
    if not store_rotated:
        fwd.append((FWD_ROTATED_STORE, "        if SAVE_ROTATED and False:"))
    files = {
        "ssd_gluon_fwd.py": edited(KERNELS + "ssd_gluon_fwd.py", fwd),
        "ssd_gluon_state_bwd.py": edited(KERNELS + "ssd_gluon_state_bwd.py", [
            (STATE_WALK_STORE, f"        if {state_condition}:\n    " + STATE_WALK_STORE)]),
        "ssd_gluon_head_bwd.py": edited(KERNELS + "ssd_gluon_head_bwd.py", [(HEAD_STATE_LOADS, head_loads)]),
    }
    if not group_reads_states:   # mamba's shape: the group backward (one program per group and chunk)
        files["ssd_gluon_bwd.py"] = edited(KERNELS + "ssd_gluon_bwd.py", [
            (GROUP_STATE_BYTES, GROUP_STATE_BYTES.replace(" + 2 * s_desc.block_type.nbytes", "")),
            (GROUP_STATE_LOADS, "")])
    folder = os.path.join(out, f".ab_{name}", KERNELS)
    os.makedirs(folder, exist_ok=True)
    for file_name, text in files.items():
        with open(os.path.join(folder, file_name), "w") as handle:
            handle.write(text)
    print(f"wrote {folder}{{{', '.join(files)}}}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=ROOT, help="folder to write the .ab_* folders into (default: the repo)")
    out = parser.parse_args().out
    variant(out, "half", "c % 2 == 1", HEAD_ONE_STATE)
    variant(out, "none", "False", HEAD_NO_STATE, group_reads_states=False)
    variant(out, "none_norot", "False", HEAD_NO_STATE, store_rotated=False, group_reads_states=False)


if __name__ == "__main__":
    main()
