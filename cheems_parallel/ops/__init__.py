"""Pure-PyTorch functional references (spec §2-4). Every kernel in `cheems_parallel.kernels` is tested against these."""
from .dmattn import dmattn_decode_ref, dmattn_ref
from .product_keys import product_key_topk
from .rope import apply_rope, rope_tables
from .ssd import ssd_chunked, ssd_scan_ref

__all__ = ["apply_rope", "dmattn_decode_ref", "dmattn_ref", "product_key_topk", "rope_tables", "ssd_chunked", "ssd_scan_ref"]
