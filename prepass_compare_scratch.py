# Scratch (not committed): the session-5 pre-pass vs the new one, same run, bench/dmattn.py's shapes.
import sys, torch, triton.testing
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import dmattn as bench
import prepass_old_scratch as old
from cheems_parallel.kernels import dmattn as new
for length in (1024, 2048, 4096, 8192, 16384):
    batch = 65536 // length
    for kind in ("clustered", "random"):
        q, k, v, m = bench.make_inputs(batch, 16, 16, length, 128, mask_kind=kind, seed=1)
        m = m.detach(); w = length // 8
        ro, to = old.keep_window_thresholds(m, w)
        rn, tn = new.keep_window_thresholds(m, w)
        same = torch.equal(ro, rn) and torch.equal(to, tn)
        t_old = triton.testing.do_bench(lambda: old.keep_window_thresholds(m, w), warmup=10, rep=50, return_mode="median")
        t_new = triton.testing.do_bench(lambda: new.keep_window_thresholds(m, w), warmup=10, rep=50, return_mode="median")
        t_sort = triton.testing.do_bench(lambda: torch.sort(m.reshape(-1, length).flip(-1), dim=-1, descending=True, stable=True), warmup=10, rep=50, return_mode="median")
        print(f"prepass l={length:>5} {kind:<9} equal={same} old {t_old:.3f} ms new {t_new:.3f} ms (sort alone {t_sort:.3f}) x {t_old/t_new:.2f}", flush=True)
        del q, k, v, m
