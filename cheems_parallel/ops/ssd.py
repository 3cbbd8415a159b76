"""SSD (Mamba-2 state space duality) references: the sequential recurrence and the chunked dual form.

Shapes (spec §2): x (b, l, h, p); dt (b, l, h), already softplus'ed; A (h,), negative;
B, C (b, l, h, n), already rotated; D (h,) or None; states (b, h, p, n);
seq_idx (b, l) optional non-decreasing document ids: the state resets where the id changes
(document masking), and the returned final state is the last document's.
Recurrence per head: S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T ;  y_t = S_t C_t (+ D x_t).
Both functions compute in float32 (float64 if given float64) and return y in x's dtype.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_scan_ref(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """Token-by-token recurrence; the ground truth for every other SSD implementation."""
    dtype = _compute_dtype(x)
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf, dtf, Af, Bf, Cf = (t.to(dtype) for t in (x, dt, A, B, C))
    state = (torch.zeros(b, h, p, n, dtype=dtype, device=x.device) if initial_state is None
             else initial_state.to(dtype))
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)                                   # (b, h)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(dtype)[:, None]
        update = torch.einsum("bhp,bhn->bhpn", dtf[:, t, :, None] * xf[:, t], Bf[:, t])
        state = decay[..., None, None] * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cf[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + xf * D.to(dtype)[:, None]
    return y.to(x.dtype), state


def _segsum(a):
    """a (..., q) -> (..., q, q) with [i, j] = sum_{j<k<=i} a_k for j <= i, -inf above the diagonal."""
    q = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return diff.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size=256, D=None, initial_state=None, seq_idx=None):
    """The chunked (dual) algorithm of spec §2, steps 1-5. Pads l to a multiple of chunk_size."""
    dtype = _compute_dtype(x)
    b, l, h, p = x.shape
    n = B.shape[-1]
    q = chunk_size
    pad = (-l) % q
    xf, dtf, Bf, Cf = (t.to(dtype) for t in (x, dt, B, C))
    if pad:
        # zero dt on padding: no decay and no input, so the final state is unaffected.
        xf, dtf, Bf, Cf = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dtf, Bf, Cf))
    c = (l + pad) // q
    if seq_idx is not None:
        # padding continues the last document, so it never resets the final state
        seq = F.pad(seq_idx, (0, pad), mode="replicate") if pad else seq_idx
        seq = seq.reshape(b, c, q)
    xc = xf.reshape(b, c, q, h, p)
    Bc = Bf.reshape(b, c, q, h, n)
    Cc = Cf.reshape(b, c, q, h, n)
    a = (dtf * A.to(dtype)).reshape(b, c, q, h).permute(0, 3, 1, 2)        # (b, h, c, q)
    s = torch.cumsum(a, dim=-1)                                              # inclusive cumsum
    dx = xc * dtf.reshape(b, c, q, h, 1)                                     # dt_u x_u

    # 1. intra-chunk (diagonal blocks)
    decay = torch.exp(_segsum(a))                                            # (b, h, c, q, q)
    if seq_idx is not None:
        decay = decay * (seq[:, None, :, :, None] == seq[:, None, :, None, :]).to(dtype)
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cc, Bc) * decay
    y_diag = torch.einsum("bhcij,bcjhp->bcihp", scores, dx)
    # 2. chunk states
    to_end = torch.exp(s[..., -1:] - s)                                      # (b, h, c, q)
    if seq_idx is not None:  # only tokens of the chunk's last document reach its end state
        to_end = to_end * (seq == seq[..., -1:]).to(dtype)[:, None]
    chunk_states = torch.einsum("bhcq,bcqhp,bcqhn->bchpn", to_end, dx, Bc)
    # 3. state passing across chunks
    state = (torch.zeros(b, h, p, n, dtype=dtype, device=x.device) if initial_state is None
             else initial_state.to(dtype))
    chunk_decay = torch.exp(s[..., -1])                                      # (b, h, c)
    if seq_idx is not None:  # a document starting inside chunk ci drops the carried state
        prev_last = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)        # (b, c)
        chunk_decay = chunk_decay * (prev_last == seq[..., -1]).to(dtype)[:, None]
    prev_states = []
    for ci in range(c):
        prev_states.append(state)
        state = chunk_decay[:, :, ci, None, None] * state + chunk_states[:, ci]
    prev = torch.stack(prev_states, dim=1)                                   # (b, c, h, p, n)
    # 4. inter-chunk (off-diagonal) contribution
    into = torch.exp(s)                                                      # (b, h, c, q)
    if seq_idx is not None:  # a token sees the carried state only within the same document
        into = into * (seq == prev_last[..., None]).to(dtype)[:, None]
    y_off = torch.einsum("bcihn,bchpn,bhci->bcihp", Cc, prev, into)
    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + xf[:, :l] * D.to(dtype)[:, None]
    return y.to(x.dtype), state
