import torch, triton, triton.language as tl
KEEP_ALL = 2**31 - 1
KEEP_ALL_IN_KERNEL = tl.constexpr(KEEP_ALL)
@triton.jit
def _threshold_kernel(key_rank, candidate_rank, candidate_count, threshold, seq_len, num_chunks, keep_window,
                      CHUNK: tl.constexpr, PREFIX_BLOCK: tl.constexpr):
    """Grid (num_chunks, b·h). For the CHUNK queries of one chunk, walk them in order, counting for every
    candidate rank how many keys of the prefix rank at or below it; a query's threshold is the smallest
    candidate present in its prefix whose count reaches w.

    candidate_rank (b·h, chunks, CHUNK+1): the (w-u)-th smallest rank among keys before the chunk, u = 0..CHUNK
    (KEEP_ALL when absent); their counts start at w-u. The chunk's own keys are the other candidates; their
    counts start at candidate_count (b·h, chunks, CHUNK): keys before the chunk with a rank at or below."""
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    table_row = row * num_chunks + chunk
    prefix_offsets = tl.arange(0, PREFIX_BLOCK)
    prefix_rank = tl.load(candidate_rank + table_row * (CHUNK + 1) + prefix_offsets,
                          mask=prefix_offsets < CHUNK + 1, other=KEEP_ALL_IN_KERNEL)
    prefix_count = keep_window - prefix_offsets
    own_offsets = tl.arange(0, CHUNK)
    own_rank = tl.load(key_rank + row * seq_len + start + own_offsets, mask=start + own_offsets < seq_len,
                       other=KEEP_ALL_IN_KERNEL)
    own_count = tl.load(candidate_count + table_row * CHUNK + own_offsets)
    for offset in range(0, CHUNK):
        inside = start + offset < seq_len
        rank = tl.load(key_rank + row * seq_len + start + offset, mask=inside, other=KEEP_ALL_IN_KERNEL)
        prefix_count += (rank <= prefix_rank).to(tl.int32)
        own_count += (rank <= own_rank).to(tl.int32)
        prefix_ok = (prefix_count >= keep_window) & (prefix_rank < KEEP_ALL_IN_KERNEL)
        own_ok = (own_count >= keep_window) & (own_offsets <= offset) & (own_rank < KEEP_ALL_IN_KERNEL)
        best = tl.minimum(tl.min(tl.where(prefix_ok, prefix_rank, KEEP_ALL_IN_KERNEL), 0),
                          tl.min(tl.where(own_ok, own_rank, KEEP_ALL_IN_KERNEL), 0))
        tl.store(threshold + row * seq_len + start + offset, best, mask=inside)


def keep_window_thresholds(mask_bias: torch.Tensor, keep_window: int, segment_ids: torch.Tensor | None = None,
                           chunk_size: int = 128, max_elements: int = 2**28):
    """(b, h, l) mask -> (key_rank, query_threshold), both int32 (b, h, l).

    key_rank[j]: position of key j when the whole row is sorted by (m desc, j desc).
    query_threshold[i]: the w-th smallest rank among keys 0..i, or KEEP_ALL while i < w.
    Query i keeps key j iff j <= i and key_rank[j] <= query_threshold[i] (== the reference's rule).

    With documents (segment_ids (b, l), each document one contiguous run) the reference ranks only the
    query's own document prefix. Sorting later documents first (then m desc, j desc) gives that for free:
    the w-th smallest rank of prefix 0..i is then the w-th of i's document prefix when that holds w keys,
    and otherwise a rank of an earlier document, which keeps the whole document prefix; keys of earlier
    documents that the threshold admits are removed by the document mask.

    Method, per chunk of `chunk_size` queries: the w-th smallest rank of a query's prefix is one of the
    chunk's own ranks or the (w-u)-th smallest rank of the keys before the chunk, u <= chunk size. A count
    table T[c, r] = #{keys before chunk c with rank <= r} (b·h·l²/chunk_size int32, built in slices of at
    most `max_elements`) gives those candidates and their starting counts; `_threshold_kernel` finishes.
    """
    batch, heads, length = mask_bias.shape
    device = mask_bias.device
    rows = mask_bias.detach().reshape(batch * heads, length)
    # A stable descending sort of the reversed row puts the nearest key first among ties.
    flipped_order = torch.sort(rows.flip(-1), dim=-1, descending=True, stable=True).indices
    key_by_rank = (length - 1) - flipped_order
    if segment_ids is not None:
        changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).to(torch.int64)
        document = torch.nn.functional.pad(changes.cumsum(-1), (1, 0))  # run index of every position
        document = document[:, None, :].expand(batch, heads, length).reshape(batch * heads, length)
        later_first = torch.sort(document.gather(-1, key_by_rank), dim=-1, descending=True, stable=True).indices
        key_by_rank = key_by_rank.gather(-1, later_first)
    positions = torch.arange(length, device=device).expand(batch * heads, length)
    key_rank = torch.empty_like(key_by_rank).scatter_(-1, key_by_rank, positions).to(torch.int32)
    if keep_window >= length:
        threshold = torch.full_like(key_rank, KEEP_ALL)
        return key_rank.reshape(batch, heads, length), threshold.reshape(batch, heads, length)

    chunk = min(triton.next_power_of_2(chunk_size), triton.next_power_of_2(length))
    num_chunks = triton.cdiv(length, chunk)
    chunk_index = torch.arange(num_chunks, device=device, dtype=torch.int32)
    targets = (keep_window - torch.arange(chunk + 1, device=device, dtype=torch.int32))
    candidate_rank = torch.empty(batch * heads, num_chunks, chunk + 1, dtype=torch.int32, device=device)
    candidate_count = torch.zeros(batch * heads, num_chunks, chunk, dtype=torch.int32, device=device)
    padded_rank = torch.zeros(batch * heads, num_chunks * chunk, dtype=torch.int64, device=device)
    padded_rank[:, :length] = key_rank
    padded_rank = padded_rank.reshape(batch * heads, num_chunks, chunk)
    rows_per_slice = max(1, max_elements // (num_chunks * length))
    for start in range(0, batch * heads, rows_per_slice):
        stop = min(start + rows_per_slice, batch * heads)
        chunk_of_rank = (key_by_rank[start:stop] // chunk).to(torch.int32)  # (n, l): chunk of the key at rank r
        # table[n, c, r] = #{keys before chunk c with rank <= r}; non-decreasing in r.
        table = (chunk_of_rank[:, None, :] < chunk_index[None, :, None]).cumsum(-1, dtype=torch.int32)
        flat = table.reshape(-1, length)
        # The (w-u)-th smallest pre-chunk rank is the first r where the count reaches w-u.
        found = torch.searchsorted(flat, targets.expand(flat.shape[0], chunk + 1).contiguous())
        present = (targets >= 1) & (found < length)
        candidate_rank[start:stop] = torch.where(present, found, KEEP_ALL).reshape(stop - start, num_chunks, chunk + 1)
        candidate_count[start:stop] = table.gather(-1, padded_rank[start:stop])
    threshold = torch.empty(batch * heads, length, dtype=torch.int32, device=device)
    _threshold_kernel[(num_chunks, batch * heads)](
        key_rank, candidate_rank, candidate_count, threshold, length, num_chunks, keep_window,
        CHUNK=chunk, PREFIX_BLOCK=triton.next_power_of_2(chunk + 1))
    return key_rank.reshape(batch, heads, length), threshold.reshape(batch, heads, length)


