"""Triton kernels for the fused KoLeo loss.

Search set S (M, D) of raw features, query rows S[offset : offset + n], u = s / max(|s|, eps):

    nn_k(i)  = the k-th largest u_i·u_j over j != offset + i (ties to the lowest j),   k < K
    d_ik     = |u_i - u_nn_k(i) + pdist_eps|                 (torch.nn.PairwiseDistance(2, eps=pdist_eps))
    loss     = -1/(nK) Σ_ik log(d_ik + eps)

Forward, four launches, no atomics, deterministic:
  `_koleo_norm_kernel`    |s| for every row of S (M floats); for fp32 input also u = s / max(|s|, eps) in fp16, the
                          copy the search runs on (fp16 keeps TF32's 10 mantissa bits at half the bytes and twice the
                          tensor-core rate);
  `_koleo_search_kernel`  grid (query tiles, search splits): each program scores its BLOCK_M query rows against one
                          contiguous split of the search set in (BLOCK_M, BLOCK_N) tiles on the tensor cores and keeps
                          each row's KC best (score, index) in registers; no n×M matrix anywhere. Splitting the set
                          keeps ~2 programs per SM when n is small. fp32 input is searched on its fp16 copy of u with
                          KC = K + 8 candidates (RERANK), 16-bit input as it is (exact products, fp32 accumulation)
                          with KC = K. `_koleo_search_resident_kernel` is the same search with the query tile loaded
                          once per program and kept in shared memory across the search tiles, where it and two search
                          tiles fit (d <= 384; the launcher picks, see _block_sizes). When the query rows are the
                          whole set (offset 0, n = M) and n >= SYMMETRIC_MIN_ROWS, `_koleo_search_symmetric_kernel`
                          scores each pair of rows once and offers the score to both (half the tile pairs; the
                          columns' running top-KC goes through per-slab candidate lists, see the kernel);
  `_koleo_merge_kernel`   per query row: the KC best of the splits' candidates (ties to the lowest index), their
                          exact fp32 similarities from the input rows when re-ranking, the K best of those, then d_ik
                          from the rows (not from 2 - 2cos, which cancels for close pairs) and the tile's share of the
                          loss;
  `_koleo_sum_kernel`     the tiles' partial sums in a fixed order (one program).
"""

import torch
import triton
import triton.language as tl


RERANK_EXTRA = 8  # candidates the TF32 search keeps beyond K for the exact re-ranking
MAX_MERGE_WIDTH = 512  # splits x KCP candidates per row in the merge kernel's register tile (8 rows)
SYMMETRIC_MERGE_WIDTH = 1024  # the same for the symmetric search's lists, merged 2 rows per program
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _koleo_norm_kernel(S, NORM, U, M, D, stride_m, stride_d, stride_u, eps,
                       WRITE_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # |s| of each row; with WRITE_U also u = s / max(|s|, eps) rounded to fp16 into U (M, stride_u) contiguous, the
    # columns past D zero: the copy the fp32 search runs on (the second pass re-reads the rows, from L2).
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = rows < M
    cols = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=mr[:, None] & (k < D)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    nrm = tl.sqrt(sq)
    tl.store(NORM + rows, nrm, mask=mr)
    if WRITE_U:
        den = tl.maximum(nrm, eps)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + cols
            m2 = mr[:, None] & (k < D)[None, :]
            x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            tl.store(U + rows[:, None] * stride_u + k[None, :], (x / den[:, None]).to(tl.float16),
                     mask=mr[:, None] & (k < stride_u)[None, :])


@triton.jit
def _koleo_search_init(n, M, offset, cols_per_split, NORM, eps, KC: tl.constexpr, KCP: tl.constexpr,
                       BLOCK_M: tl.constexpr, NORMALIZED: tl.constexpr):
    """What both search kernels start from: this program's query rows, their 1/|s_i| (1 when the searched rows are
    the normalised copy), its split [j_lo, j_hi) and the empty top-KC state."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query row i; its search index is offset + i
    mr = rows < n
    grows = (offset + rows).to(tl.int64)
    if NORMALIZED:
        r_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    else:
        r_i = 1.0 / tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
    j_lo = tl.program_id(1) * cols_per_split
    j_hi = tl.minimum(M, j_lo + cols_per_split)
    # Running top-KC per row, unsorted: (value, index). Empty slots hold (-inf, M): any real candidate beats them and
    # an index of M marks "no candidate". Padding slots (>= KC) hold +inf so they are never the worst slot.
    slots = tl.arange(0, KCP)
    pad = slots[None, :] >= KC
    best_v = tl.where(pad, float("inf"), tl.full((BLOCK_M, KCP), float("-inf"), tl.float32))
    best_i = tl.where(pad, -1, tl.full((BLOCK_M, KCP), M, tl.int32))
    return rows, mr, grows, r_i, j_lo, j_hi, best_v, best_i


@triton.jit
def _koleo_scores(acc, cols, mc, r_i, NORM, eps, keep, NORMALIZED: tl.constexpr):
    """Cosine similarities of one tile from acc = s_i·s_j (u_i·u_j when NORMALIZED), -inf where not `keep` (the
    caller's mask: columns past the set, the row itself, ...)."""
    if NORMALIZED:
        sim = acc
    else:
        r_j = 1.0 / tl.maximum(tl.load(NORM + cols, mask=mc, other=1.0), eps)
        sim = acc * r_i[:, None] * r_j[None, :]
    return tl.where(keep, sim, float("-inf"))


@triton.jit
def _koleo_topk_round(sim, cols, best_v, best_i, v, wv, KCP: tl.constexpr):
    """One round of _koleo_topk_merge: every row's best remaining candidate (value v, its lowest column) replaces the
    row's worst held entry (value wv) where it is greater, and leaves sim."""
    big = 2147483647
    slots = tl.arange(0, KCP)
    c = tl.min(tl.where(sim == v[:, None], cols[None, :], big), axis=1)
    # Among equal worst values the highest index is the worst.
    wi = tl.max(tl.where(best_v == wv[:, None], best_i, -1), axis=1)
    ws = tl.min(tl.where((best_v == wv[:, None]) & (best_i == wi[:, None]), slots[None, :], KCP), axis=1)
    put = (v > wv)[:, None] & (slots[None, :] == ws[:, None])
    best_v = tl.where(put, v[:, None], best_v)
    best_i = tl.where(put, c[:, None], best_i)
    sim = tl.where(cols[None, :] == c[:, None], float("-inf"), sim)
    return sim, best_v, best_i


@triton.jit
def _koleo_topk_merge(sim, cols, best_v, best_i, KC: tl.constexpr, KCP: tl.constexpr, EARLY_STOP: tl.constexpr):
    """Each row's top-KC state (value, index) after the candidates sim (rows, columns) with indices cols: columns arrive
    in increasing index order across calls, so a candidate equal to a held value always loses (ties to the lowest
    index) and "strictly greater than the worst held value" is the whole test. Most tiles change nothing.
    Up to KC rounds (_koleo_topk_round). EARLY_STOP: the rounds stop once no row's best remaining candidate beats its
    worst held value (no later, smaller one can), in a run-time loop; else a tile that improves any row takes all KC
    rounds, unrolled (the resident search keeps it so: a run-time loop there stops the pipeliner from prefetching
    whole search tiles, NOTES KoLeo section 7)."""
    v = tl.max(sim, axis=1)
    wv = tl.min(best_v, axis=1)
    if EARLY_STOP:
        t = 0
        while (t < KC) & (tl.max((v > wv).to(tl.int32), axis=0) > 0):
            sim, best_v, best_i = _koleo_topk_round(sim, cols, best_v, best_i, v, wv, KCP)
            v = tl.max(sim, axis=1)
            wv = tl.min(best_v, axis=1)
            t += 1
    else:
        if tl.max((v > wv).to(tl.int32), axis=0) > 0:
            for _t in tl.static_range(KC):
                sim, best_v, best_i = _koleo_topk_round(sim, cols, best_v, best_i, v, wv, KCP)
                v = tl.max(sim, axis=1)
                wv = tl.min(best_v, axis=1)
    return best_v, best_i


@triton.jit
def _koleo_search_update(acc, cols, mc, grows, r_i, NORM, eps, best_v, best_i, KC: tl.constexpr, KCP: tl.constexpr,
                         NORMALIZED: tl.constexpr, EARLY_STOP: tl.constexpr):
    """The top-KC state after one (query tile, search tile) pair: acc = s_i·s_j over the tile (u_i·u_j when
    NORMALIZED), cols its indices j."""
    sim = _koleo_scores(acc, cols, mc, r_i, NORM, eps, mc[None, :] & (cols[None, :] != grows[:, None]), NORMALIZED)
    return _koleo_topk_merge(sim, cols, best_v, best_i, KC, KCP, EARLY_STOP)


@triton.jit
def _koleo_search_store(CAND_V, CAND_I, rows, mr, best_v, best_i, KC: tl.constexpr, KCP: tl.constexpr):
    # (n, splits, KCP) candidates; the merge kernel reads the first KC slots of each split.
    slots = tl.arange(0, KCP)
    out = (rows.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * KCP
    m2 = mr[:, None] & (slots[None, :] < KC)
    tl.store(CAND_V + out[:, None] + slots[None, :], best_v, mask=m2)
    tl.store(CAND_I + out[:, None] + slots[None, :], best_i, mask=m2)


@triton.jit
def _koleo_tile_dots(q_ptr, c_ptr, mr, mc, D, stride_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 dots of the rows at q_ptr (BLOCK_M, 1) with those at c_ptr (BLOCK_N, 1), both streamed
    in BLOCK_K-wide chunks (masked rows and columns read as 0)."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + kk
        mk = k < D
        a = tl.load(q_ptr + k[None, :] * stride_d, mask=mr[:, None] & mk[None, :], other=0.0)
        b = tl.load(c_ptr + k[None, :] * stride_d, mask=mc[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _koleo_search_kernel(
    S, NORM, CAND_V, CAND_I,
    n, M, D, offset, cols_per_split,
    stride_m, stride_d, eps,
    KC: tl.constexpr, KCP: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Chunked: for every search tile, both the query and the search tile stream through in BLOCK_K-wide chunks (the
    # query tile is re-read from L2 once per search tile). For any D.
    rows, mr, grows, r_i, j_lo, j_hi, best_v, best_i = _koleo_search_init(n, M, offset, cols_per_split, NORM, eps,
                                                                          KC, KCP, BLOCK_M, NORMALIZED)
    q_ptr = S + grows[:, None] * stride_m
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mc = cols < j_hi
        acc = _koleo_tile_dots(q_ptr, S + cols[:, None].to(tl.int64) * stride_m, mr, mc, D, stride_d, BLOCK_M, BLOCK_N,
                               BLOCK_K)
        best_v, best_i = _koleo_search_update(acc, cols, mc, grows, r_i, NORM, eps, best_v, best_i, KC, KCP,
                                              NORMALIZED, True)
    _koleo_search_store(CAND_V, CAND_I, rows, mr, best_v, best_i, KC, KCP)


@triton.jit
def _koleo_search_resident_kernel(
    S, NORM, CAND_V, CAND_I,
    n, M, D, offset, cols_per_split,
    stride_m, stride_d, eps,
    KC: tl.constexpr, KCP: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
):
    # Query tile resident: its NUM_K = ceil(D / BLOCK_K) chunks are loaded once, as a tuple (a compile-time loop can
    # index it; a run-time one cannot), before the search loop; the compiler puts each chunk in shared memory there
    # (local_alloc hoisted out of the loop: the TTGIR and PTX of Triton 3.6 and 3.9 load and store the query tile
    # before the loop, which holds only the search tiles' cp.async and the wgmma) and every search tile's dots read
    # it from shared memory. The K loop is unrolled, so the pipeliner prefetches whole search tiles (num_stages x
    # BLOCK_N x NUM_K·BLOCK_K elements): the launcher takes this kernel only where that and the query tile fit shared
    # memory (_block_sizes).
    rows, mr, grows, r_i, j_lo, j_hi, best_v, best_i = _koleo_search_init(n, M, offset, cols_per_split, NORM, eps,
                                                                          KC, KCP, BLOCK_M, NORMALIZED)
    kk = tl.arange(0, BLOCK_K)
    q_ptr = S + grows[:, None] * stride_m
    q = ()
    for kc in tl.static_range(NUM_K):
        k = kc * BLOCK_K + kk
        q = q + (tl.load(q_ptr + k[None, :] * stride_d, mask=mr[:, None] & (k < D)[None, :], other=0.0),)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mc = cols < j_hi
        c_ptr = S + cols[:, None].to(tl.int64) * stride_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kc in tl.static_range(NUM_K):
            k = kc * BLOCK_K + kk
            b = tl.load(c_ptr + k[None, :] * stride_d, mask=mc[:, None] & (k < D)[None, :], other=0.0)
            acc = tl.dot(q[kc], tl.trans(b), acc)
        best_v, best_i = _koleo_search_update(acc, cols, mc, grows, r_i, NORM, eps, best_v, best_i, KC, KCP,
                                              NORMALIZED, False)
    _koleo_search_store(CAND_V, CAND_I, rows, mr, best_v, best_i, KC, KCP)


@triton.jit
def _triangle_pair(p):
    """(a, b) with 0 <= a <= b and p = b (b + 1) / 2 + a: the p-th pair of the upper triangle, column by column. The
    fp32 square root's estimate of b corrected by one either way (exact for every p the launcher makes)."""
    b = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    b = tl.where((b + 1) * (b + 2) // 2 <= p, b + 1, b)
    b = tl.where(b * (b + 1) // 2 > p, b - 1, b)
    return p - b * (b + 1) // 2, b


@triton.jit
def _grouped_pair(p, nsb, sup):
    """(a, b) with 0 <= a <= b < nsb: the p-th slab pair in an order that keeps the programs running at once on few
    slabs. Super-columns of `sup` column slabs, left to right; in each, the rows above its diagonal block one by one
    (each against the super-column's w <= sup columns, the column fastest), then the triangle of the diagonal block.
    A window of W consecutive programs then reads about sup + W / sup slabs, where the column-by-column order reads
    every slab up to its column (most of the set late in the run)."""
    big = 0
    for s in range(1, tl.cdiv(nsb, sup)):  # the super-column: the last whose first pair comes at or before p
        m = s * sup
        big = tl.where(m * (m + 1) // 2 <= p, s, big)
    m0 = big * sup
    q = p - m0 * (m0 + 1) // 2
    w = tl.minimum(sup, nsb - m0)
    above = q < m0 * w
    da, db = _triangle_pair(tl.where(above, 0, q - m0 * w))
    return tl.where(above, q // w, m0 + da), tl.where(above, m0 + q % w, m0 + db)


@triton.jit
def _koleo_search_symmetric_kernel(
    S, NORM, CAND_V, CAND_I,
    n, D, NSB, GROUP, SUPER,
    stride_m, stride_d, eps,
    KC: tl.constexpr, KCP: tl.constexpr,
    NORMALIZED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The query rows are the whole set (offset 0, n = M): every score u_i·u_j is computed once, for i < j, and offered
    # to both rows, so the search does half the tile pairs. The rows are cut into BLOCK_M-row tiles and those into NSB
    # slabs of GROUP tiles; program (a, b), a <= b, scores the row tiles of slab a against the BLOCK_N-column tiles of
    # slab b (when a == b only those from the row tile's own start on), with every score on or below the diagonal
    # (row >= column) masked.
    #   Rows (slab a) keep their running top-KC over the program's column tiles in registers, stored as candidate slot
    #   b; columns (slab b) keep theirs over the program's row tiles in the candidate slot a (a < b) or NSB (a == b),
    #   read back and written for every row tile (the one program that owns the slot writes it).
    # Slots of a row r in slab c: its higher columns, slab by slab (c .. NSB - 1), its lower rows in slabs 0 .. c - 1,
    # and in its own slab (NSB): disjoint index sets covering j != r, each written once, merged like search splits.
    # Programs take the slab pairs in _grouped_pair's order (super-columns of SUPER slabs: L2 reuse).
    a, b = _grouped_pair(tl.program_id(0), NSB, SUPER)
    col_slot = tl.where(a < b, a, NSB)
    nslots = NSB + 1
    R: tl.constexpr = BLOCK_M // BLOCK_N  # column tiles per row tile
    tiles = tl.cdiv(n, BLOCK_M)
    i_lo = a * GROUP
    i_hi = tl.minimum(i_lo + GROUP, tiles)
    j_lo = b * GROUP * R
    j_hi = tl.minimum(j_lo + GROUP * R, tl.cdiv(n, BLOCK_N))
    slots = tl.arange(0, KCP)
    pad = slots[None, :] >= KC
    for it in range(i_lo, i_hi):
        rows = it * BLOCK_M + tl.arange(0, BLOCK_M)
        mr = rows < n
        grows = rows.to(tl.int64)
        if NORMALIZED:
            r_i = tl.full((BLOCK_M,), 1.0, tl.float32)
        else:
            r_i = 1.0 / tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
        best_v = tl.where(pad, float("inf"), tl.full((BLOCK_M, KCP), float("-inf"), tl.float32))
        best_i = tl.where(pad, -1, tl.full((BLOCK_M, KCP), n, tl.int32))
        q_ptr = S + grows[:, None] * stride_m
        for jt in range(tl.maximum(j_lo, it * R), j_hi):
            cols = jt * BLOCK_N + tl.arange(0, BLOCK_N)
            mc = cols < n
            acc = _koleo_tile_dots(q_ptr, S + cols[:, None].to(tl.int64) * stride_m, mr, mc, D, stride_d, BLOCK_M,
                                   BLOCK_N, BLOCK_K)
            # Above the diagonal only (rows < cols < n: the row itself, rows past the set and columns past it are out).
            sim = _koleo_scores(acc, cols, mc, r_i, NORM, eps, mc[None, :] & (rows[:, None] < cols[None, :]),
                                NORMALIZED)
            best_v, best_i = _koleo_topk_merge(sim, cols, best_v, best_i, KC, KCP, True)
            # The columns' state: empty at the program's first row tile, else what the previous row tile stored.
            c_out = (cols.to(tl.int64) * nslots + col_slot) * KCP
            m2 = mc[:, None] & (slots[None, :] < KC)
            held = m2 & (slots[None, :] * 0 + it > i_lo)  # (broadcast first: the interpreter refuses a scalar mask)
            ptr_v = CAND_V + c_out[:, None] + slots[None, :]
            ptr_i = CAND_I + c_out[:, None] + slots[None, :]
            col_v = tl.load(ptr_v, mask=held, other=tl.where(pad, float("inf"), float("-inf")))
            col_i = tl.load(ptr_i, mask=held, other=tl.where(pad, -1, n))
            col_v, col_i = _koleo_topk_merge(tl.trans(sim), rows, col_v, col_i, KC, KCP, True)
            tl.store(ptr_v, col_v, mask=m2)
            tl.store(ptr_i, col_i, mask=m2)
            # The next row tile reads these back, possibly through other threads of the program.
            tl.debug_barrier()
        r_out = (grows * nslots + b) * KCP
        m2 = mr[:, None] & (slots[None, :] < KC)
        tl.store(CAND_V + r_out[:, None] + slots[None, :], best_v, mask=m2)
        tl.store(CAND_I + r_out[:, None] + slots[None, :], best_i, mask=m2)


@triton.jit
def _koleo_merge_kernel(
    S, NORM, CAND_V, CAND_I, IDX, DIST, PART,
    n, M, D, offset,
    stride_m, stride_d,
    eps, pdist_eps,
    SPLITS: tl.constexpr, TOPK: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr, WIDTH: tl.constexpr,
    RERANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < n
    grows = (offset + rows).to(tl.int64)
    big = 2147483647
    slots = tl.arange(0, KCP)
    w = tl.arange(0, WIDTH)
    m2 = mr[:, None] & ((w < SPLITS * KCP) & (w % KCP < KC))[None, :]
    base = rows.to(tl.int64)[:, None] * (SPLITS * KCP) + w[None, :]
    cv = tl.load(CAND_V + base, mask=m2, other=float("-inf"))
    ci = tl.load(CAND_I + base, mask=m2, other=M)
    d_i = tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
    q_ptr = S + grows[:, None] * stride_m

    # The splits hold disjoint column ranges, so indices are unique (but for the empty marker M). The KC best by search
    # score, ties to the lowest index; re-ranked by their exact fp32 similarity from the rows when RERANK.
    sel_v = tl.full((BLOCK_R, KCP), float("-inf"), tl.float32)
    sel_i = tl.full((BLOCK_R, KCP), M, tl.int32)
    for t in tl.static_range(KC):
        v = tl.max(cv, axis=1)
        c = tl.min(tl.where(cv == v[:, None], ci, big), axis=1)
        cv = tl.where(ci == c[:, None], float("-inf"), cv)
        if RERANK:
            found = c < M
            j = tl.where(found, c, 0).to(tl.int64)
            d_j = tl.maximum(tl.load(NORM + j, mask=mr, other=1.0), eps)
            dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_P):
                k = k0 + tl.arange(0, BLOCK_P)
                mk = mr[:, None] & (k < D)[None, :]
                xi = tl.load(q_ptr + k[None, :] * stride_d, mask=mk, other=0.0).to(tl.float32)
                xj = tl.load(S + j[:, None] * stride_m + k[None, :] * stride_d, mask=mk, other=0.0).to(tl.float32)
                dot += tl.sum(xi * xj, axis=1)
            v = tl.where(found, dot / d_i / d_j, float("-inf"))
        sel_v = tl.where(slots[None, :] == t, v[:, None], sel_v)
        sel_i = tl.where(slots[None, :] == t, c[:, None], sel_i)

    # The K best, best first (ties to the lowest index); d_ik from the rows.
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t in tl.static_range(TOPK):
        v = tl.max(sel_v, axis=1)
        c = tl.min(tl.where(sel_v == v[:, None], sel_i, big), axis=1)
        sel_v = tl.where(sel_i == c[:, None], float("-inf"), sel_v)
        found = c < M  # false only when the similarities were NaN
        j = tl.where(found, c, 0).to(tl.int64)
        d_j = tl.maximum(tl.load(NORM + j, mask=mr, other=1.0), eps)
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_P):
            k = k0 + tl.arange(0, BLOCK_P)
            mk = mr[:, None] & (k < D)[None, :]
            xi = tl.load(q_ptr + k[None, :] * stride_d, mask=mk, other=0.0).to(tl.float32)
            xj = tl.load(S + j[:, None] * stride_m + k[None, :] * stride_d, mask=mk, other=0.0).to(tl.float32)
            # Division, as F.normalize does: duplicate rows give exactly u_i - u_j = 0.
            diff = tl.where(mk, xi / d_i[:, None] - xj / d_j[:, None] + pdist_eps, 0.0)
            sq += tl.sum(diff * diff, axis=1)
        dist = tl.where(found, tl.sqrt(sq), float("nan"))
        tl.store(IDX + rows.to(tl.int64) * TOPK + t, j, mask=mr)
        tl.store(DIST + rows.to(tl.int64) * TOPK + t, dist, mask=mr)
        row_sum += tl.where(mr, tl.log(dist + eps), 0.0)
    tl.store(PART + pid, tl.sum(row_sum, axis=0))


@triton.jit
def _koleo_sum_kernel(PART, LOSS, num, scale, BLOCK: tl.constexpr):
    # One program: the partials in a fixed order, so the loss is the same on every run.
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, num, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        total += tl.load(PART + p, mask=p < num, other=0.0)
    tl.store(LOSS, -tl.sum(total, axis=0) * scale)


# Shared memory the resident search may plan for: the query tile plus RESIDENT_STAGES whole search tiles, below sm_90's
# 227 KB per CTA with room for the compiler's scratch (the row reductions: a few hundred bytes).
RESIDENT_SMEM = 200 * 1024
RESIDENT_STAGES = 2
# ... and only below this many query rows. Its top-k rounds are unrolled (KC of them on every tile that improves any
# row, which is nearly every tile): 2923 instructions per warp per 128 x 64 tile pair for fp32 input (KC = 9), read
# from the SASS, about 3.5x the tile's matrix work at d = 384 even at one instruction per scheduler per clock; the
# chunked search's run-time rounds stop early (~3 per tile over many tiles) and the symmetric one halves the pairs.
# The roofline with that count (benchmarks/NOTES.md, KoLeo section 10) puts the resident kernel behind them from
# n = 4096 (fp32 d = 384: 0.099 against 0.085 ms there, 0.98 against 0.51 at n = 16384; 16-bit 0.067 against 0.061).
RESIDENT_MAX_ROWS = 4096


def _resident_smem(D, block_m, block_n, block_k, elem):
    """Bytes of shared memory the resident search's tiles take: the query tile once, the search tile per stage."""
    return (block_m + RESIDENT_STAGES * block_n) * triton.cdiv(D, block_k) * block_k * elem


def _block_sizes(n, D, on_cpu, rerank, resident=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_P, programs the search aims for, spare candidates of the re-ranked search,
    whether the search keeps the query tile resident). The searched rows are 16-bit in every case (the input's, or
    for fp32 input the fp16 copy of u); `rerank`: fp32 input (spares for the exact re-ranking). `resident` forces the
    kernel (tests); by default the resident one wherever its GPU tiles fit shared memory (on the CPU too, so that the
    interpreter tests take the GPU's path) and the query rows are fewer than RESIDENT_MAX_ROWS."""
    extra = RERANK_EXTRA if rerank else 0
    # K chunks of 256 bytes per row in the resident kernel (128 elements), 128 in the other; half that where it pads
    # d less (d = 160: 192, not 256).
    res_k = max(16, min(128, triton.next_power_of_2(D)))
    if res_k > 16 and triton.cdiv(D, res_k) * res_k > triton.cdiv(D, res_k // 2) * (res_k // 2):
        res_k //= 2
    if resident is None:
        resident = n < RESIDENT_MAX_ROWS and _resident_smem(D, 128, 64, res_k, 2) <= RESIDENT_SMEM
    block_p = max(16, min(128, triton.next_power_of_2(D)))
    if on_cpu:
        # The interpreter pays per program and per op: small tiles that still satisfy tl.dot (>= 16), one split. The
        # spare candidates as on the GPU: the fp16 copy's rounding is the interpreter's too.
        block_m = max(16, min(64, triton.next_power_of_2(n)))
        return block_m, 64, max(16, min(64, triton.next_power_of_2(D))), block_p, 1, extra, resident
    if resident:
        # Each program reads its query tile once and the search set once per query tile: n·M·d/BLOCK_M + programs·
        # BLOCK_M·d elements from L2 (chunked: n·M·d·(1/BLOCK_M + 1/BLOCK_N)), a third of the chunked 64 x 128 tiles'
        # traffic and half of the 128 x 128 ones'. 128 x 64 tiles over 8 warps (two wgmma warpgroups of 64 rows):
        # the query tile and two 64-row search tiles fit up to d = 384 (192 KB: 1 CTA/SM, the same 8 warps per SM as
        # two chunked 64 x 128 CTAs). A 64-row query tile would fit up to d = 576 but with half the warps per SM (2
        # chunked CTAs -> 1 resident) for 1.5x less traffic, so the chunked kernel keeps those. The pipeliner
        # prefetches the next whole search tile while the current one is scored. The unrolled chunks' dots each end
        # in a wgmma wait: 256-byte chunks (128 wide) halve those waits against 128-byte ones.
        return 128, 64, res_k, block_p, 2 * 132, extra, True
    # wgmma needs 64 query rows per warpgroup (BLOCK_M = 32 compiled to mma.sync). Each (query tile, search tile)
    # pair loads both tiles from L2, n·M·d·(1/BLOCK_M + 1/BLOCK_N) elements in all, so 128-wide search tiles, and
    # 128 x 128 over 8 warps (~245 regs, 1 CTA/SM: the same 8 warps per SM as two 64 x 128 CTAs) wherever the grid
    # still has two programs per SM with it: a third less L2 traffic than 64 x 128 (2/128 against 3/128 of
    # n·M·d·e; predicted 1.1x at n = 2048 to 1.3x at n = 8192 on the search, d = 768-1024, where it is L2-bound).
    # Below that (n < ~2300 rows) 64 x 128 over 4 warps (~240 regs, 72 KB smem, 2 CTAs/SM): twice the query tiles,
    # so the grid (query tiles x search splits, at most one split per 128-column tile) fills the SMs.
    block_k = max(16, min(64, triton.next_power_of_2(D)))
    programs = 2 * 132
    tiles = triton.cdiv(n, 128)
    block_m = 128 if tiles * min(triton.cdiv(programs, tiles), tiles) >= programs else 64
    return block_m, 128, block_k, block_p, programs, extra, False


def _search_warps(block_m):
    return 8 if block_m >= 128 else 4  # wgmma: one warpgroup (4 warps) per 64 rows


def _search_grid(n, M, block_m, block_n, kcp, programs, splits=None):
    """(query tiles, search splits, columns per split) of the search launch. Tiles go on grid axis 0 (2^31 - 1);
    splits on axis 1 (at most MAX_GRID_YZ = 65535, and at most MAX_MERGE_WIDTH / kcp for the merge's tile)."""
    tiles = triton.cdiv(n, block_m)
    col_tiles = triton.cdiv(M, block_n)
    if splits is None:
        splits = triton.cdiv(programs, tiles)
    splits = max(1, min(splits, col_tiles, MAX_MERGE_WIDTH // kcp, MAX_GRID_YZ))
    cols_per_split = triton.cdiv(col_tiles, splits) * block_n
    splits = triton.cdiv(M, cols_per_split)  # none empty
    if tiles > 2**31 - 1:
        raise ValueError(f"koleo_loss: {n} query rows need {tiles} programs, above the grid limit 2^31 - 1")
    return tiles, splits, cols_per_split


# The symmetric search (query rows = the whole set): at most this many slabs, so that the merge reads at most
# SYMMETRIC_MAX_SLABS + 1 candidate lists per row (and, with KCP slots each, within SYMMETRIC_MERGE_WIDTH).
SYMMETRIC_MAX_SLABS = 64
# ... taken in super-columns of this many slabs (_grouped_pair): the ~132 programs running at once (1 per SM) then read
# about 8 + 132 / 8 = 25 slabs instead of up to all 64 (at n = 16384, d = 4096 in 16 bits: ~50 MB instead of 134).
SYMMETRIC_SUPER = 8
# ... and it is the default from this many rows (d past the resident kernel's reach), for lists of up to
# SYMMETRIC_MAX_KC candidates at any d and longer ones (fp32 input: topk + 8) from SYMMETRIC_LONG_LIST_D columns; see
# _use_symmetric.
SYMMETRIC_MIN_ROWS = 4096
SYMMETRIC_MAX_KC = 4
SYMMETRIC_LONG_LIST_D = 2048


def _symmetric_sizes(n, kcp, on_cpu):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP row tiles per slab, NSB slabs, programs) of the symmetric search: as many slabs
    as the merge's width allows, up to SYMMETRIC_MAX_SLABS: NSB (NSB + 1) / 2 programs (n = 16384: 2080 for 16-bit
    input, 946 for fp32, whose 16-slot lists allow 63 slabs).
    Tiles over 8 warps on the GPU: 128 x 128 with K chunks of 32 for lists of up to 16 slots (every 16-bit topk, fp32
    topk <= 8), 128 x 64 for 32-slot lists (NOTES KoLeo section 7 for the register budget that set these). The
    interpreter takes small tiles of both shapes, so that small tests span several slabs. BLOCK_K: None keeps the
    launcher's K chunk."""
    square = kcp <= 16
    if on_cpu:
        block_m, block_n, block_k = (16, 16, None) if square else (32, 16, None)
    else:
        block_m, block_n, block_k = (128, 128, 32) if square else (128, 64, None)
    tiles = triton.cdiv(n, block_m)
    max_slabs = max(1, min(SYMMETRIC_MAX_SLABS, SYMMETRIC_MERGE_WIDTH // kcp - 1))
    group = triton.cdiv(tiles, max_slabs)
    nsb = triton.cdiv(tiles, group)
    return block_m, block_n, block_k, group, nsb, nsb * (nsb + 1) // 2


def _use_symmetric(n, M, offset, resident, kc, D, symmetric=None):
    """Whether the search runs symmetric: only when the query rows are the whole set; by default where the resident
    kernel does not run (d past its reach, or n >= RESIDENT_MAX_ROWS), n >= SYMMETRIC_MIN_ROWS, and the lists are
    short (kc <= SYMMETRIC_MAX_KC) or the rows wide (D >= SYMMETRIC_LONG_LIST_D). Why the list length: each list of
    the symmetric search sees only the 1-3 tiles of its program, so a tile takes ~8 of the KC = 9 top-k rounds for
    fp32 input (simulated on iid scores; the chunked search's lists see ~43 tiles at n = 16384 and average ~3), on
    the rows' lists and on the columns' lists, whose rounds reduce across warps (1471 instructions per warp against
    464 for a rows' round, from the SASS): ~17500 instructions per warp per pair against ~2050 for each of the two
    pairs the chunked search scores instead, more than the halved matrix work saves at d <= 1024 (benchmarks/
    NOTES.md, KoLeo sections 7 and 10)."""
    if offset != 0 or n != M:
        if symmetric:
            raise ValueError("koleo_fwd_triton: the symmetric search needs the query rows to be the whole set")
        return False
    if symmetric is not None:
        return bool(symmetric)
    return not resident and n >= SYMMETRIC_MIN_ROWS and (kc <= SYMMETRIC_MAX_KC or D >= SYMMETRIC_LONG_LIST_D)


def koleo_fwd_triton(search, offset, n, topk, eps, pdist_eps, splits=None, extra=None, resident=None, symmetric=None):
    """(loss fp32 scalar, indices (n, topk) int64, distances (n, topk) fp32, norms (M,) fp32); see module doc.
    `splits` forces the number of search splits, `extra` the spare candidates of the fp32 search, `resident` and
    `symmetric` the search kernel (tests); by default they come from _block_sizes and _use_symmetric."""
    M, D = search.shape
    dev = search.device
    on_cpu = dev.type == "cpu"
    # fp32 input is searched on an fp16 copy of u = s / max(|s|, eps), written by the norm pass: fp16 keeps TF32's
    # 10 mantissa bits (|u| <= 1, far inside its range), at half the bytes and twice the tensor-core rate of a TF32
    # search of the raw rows; the merge then re-ranks KC = topk + extra candidates exactly from the fp32 rows. 16-bit
    # input is searched as it is (exact products, fp32 accumulation), top-k only.
    rerank = search.dtype == torch.float32
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_P, programs, default_extra, resident = _block_sizes(n, D, on_cpu, rerank,
                                                                                         resident)
    extra = default_extra if extra is None else extra
    kc = min(topk + extra, M - 1) if rerank else topk
    kcp = max(2, triton.next_power_of_2(kc))
    # 128 rows x 32 slots of top-k state would spill at 8 warps beside a 128 x 128 accumulator (255 regs at 16 slots);
    # beside the resident kernel's 128 x 64 one they take ~180 regs, no spill.
    if BLOCK_M == 128 and kcp > 16 and not resident:
        BLOCK_M = 64
    norm = torch.empty(M, device=dev, dtype=torch.float32)
    # The copy is zero-padded to a multiple of 16 columns and searched over all of them (the zeros add nothing to a
    # product): with rows D apart and D not a multiple of 8 the tile loads lose their 16-byte alignment, and with D
    # not a multiple of 16 their masks split the 16-byte vectors; the chunked search compiled for d = 100 (sm_90)
    # then spilled 304 bytes (256 for 16-bit rows, also at d = 770), and ran unpipelined (one stage of shared memory).
    u = (torch.empty((M, triton.cdiv(D, 16) * 16), device=dev, dtype=torch.float16) if rerank
         else norm)  # (a placeholder when unused)
    BLOCK_R, BLOCK_D = 16, max(16, min(128, triton.next_power_of_2(D)))
    _koleo_norm_kernel[(triton.cdiv(M, BLOCK_R),)](
        search, norm, u, M, D, search.stride(0), search.stride(1), u.shape[-1] if rerank else 0, eps,
        WRITE_U=rerank, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    rows = u if rerank else search
    if not rerank and D % 16:  # 16-bit rows searched as they are: the same alignment, on a zero-padded copy (O(n·d))
        rows = torch.nn.functional.pad(search, (0, triton.cdiv(D, 16) * 16 - D))
    D = rows.shape[1]  # the searched width (the merge re-ranks from the input rows, of their own width)
    if _use_symmetric(n, M, offset, resident, kc, D, symmetric):
        block_m, block_n, block_k, group, nsb, programs = _symmetric_sizes(n, kcp, on_cpu)
        cand_v = torch.empty((n, nsb + 1, kcp), device=dev, dtype=torch.float32)
        cand_i = torch.empty((n, nsb + 1, kcp), device=dev, dtype=torch.int32)
        _koleo_search_symmetric_kernel[(programs,)](
            rows, norm, cand_v, cand_i, n, D, nsb, group, 2 if on_cpu else SYMMETRIC_SUPER, rows.stride(0),
            rows.stride(1), eps,
            KC=kc, KCP=kcp, NORMALIZED=rerank, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k or BLOCK_K,
            num_warps=_search_warps(block_m),
        )
        loss, idx, dist = koleo_merge_triton(search, norm, cand_v, cand_i, offset, n, topk, kc, rerank, eps,
                                             pdist_eps, BLOCK_P)
        return loss, idx, dist, norm
    tiles, n_splits, cols_per_split = _search_grid(n, M, BLOCK_M, BLOCK_N, kcp, programs, splits)
    cand_v = torch.empty((n, n_splits, kcp), device=dev, dtype=torch.float32)
    cand_i = torch.empty((n, n_splits, kcp), device=dev, dtype=torch.int32)
    args = (rows, norm, cand_v, cand_i, n, M, D, offset, cols_per_split, rows.stride(0), rows.stride(1), eps)
    meta = dict(KC=kc, KCP=kcp, NORMALIZED=rerank, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                num_warps=_search_warps(BLOCK_M))
    if resident:
        if not on_cpu and _resident_smem(D, BLOCK_M, BLOCK_N, BLOCK_K, rows.element_size()) > RESIDENT_SMEM:
            raise ValueError(f"koleo_fwd_triton: the resident search does not fit shared memory at d = {D}")
        _koleo_search_resident_kernel[(tiles, n_splits)](*args, NUM_K=triton.cdiv(D, BLOCK_K),
                                                         num_stages=RESIDENT_STAGES, **meta)
    else:
        _koleo_search_kernel[(tiles, n_splits)](*args, **meta)
    loss, idx, dist = koleo_merge_triton(search, norm, cand_v, cand_i, offset, n, topk, kc, rerank, eps, pdist_eps,
                                         BLOCK_P)
    return loss, idx, dist, norm


def koleo_merge_triton(search, norm, cand_v, cand_i, offset, n, topk, kc, rerank, eps, pdist_eps, block_p=None):
    """(loss, indices, distances) from the search's candidates (n, splits, KCP) (score, index); see module doc."""
    M, D = search.shape
    dev = search.device
    n_splits, kcp = cand_v.shape[1], cand_v.shape[2]
    idx = torch.empty((n, topk), device=dev, dtype=torch.int64)
    dist = torch.empty((n, topk), device=dev, dtype=torch.float32)
    width = max(16, triton.next_power_of_2(n_splits * kcp))
    # Rows per program by the candidate tile's width: 8 rows x 512 candidates spilled 8 bytes on sm_90, 4 x 1024 too,
    # as did 8 rows of 32 slots (topk > 8 in fp32); 8 x 256, 4 x 512 and 2 x 1024 do not.
    MERGE_R = 2 if width > 512 else 4 if width > 256 or kcp > 16 else 8
    merge_tiles = triton.cdiv(n, MERGE_R)
    partial = torch.empty(merge_tiles, device=dev, dtype=torch.float32)
    _koleo_merge_kernel[(merge_tiles,)](
        search, norm, cand_v, cand_i, idx, dist, partial,
        n, M, D, offset, search.stride(0), search.stride(1), eps, pdist_eps,
        SPLITS=n_splits, TOPK=topk, KC=kc, KCP=kcp, WIDTH=width,
        RERANK=rerank, BLOCK_R=MERGE_R, BLOCK_P=block_p or max(16, min(128, triton.next_power_of_2(D))),
    )
    loss = torch.empty((), device=dev, dtype=torch.float32)
    _koleo_sum_kernel[(1,)](partial, loss, merge_tiles, 1.0 / (n * topk), BLOCK=256)
    return loss, idx, dist


@triton.jit
def _koleo_candidate_dots_kernel(U, CAND, OUT, n, K, D, offset, stride_m, stride_d,
                                 KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # OUT[i, c] = u_(offset + i) · u_CAND[i, c] in fp32 FMA (IEEE): the composed backend's exact re-ranking, one read
    # of each candidate row instead of torch's gather, product and sum passes.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < n
    c = tl.arange(0, KP)
    mc = mr[:, None] & (c < K)[None, :]
    cand = tl.load(CAND + rows.to(tl.int64)[:, None] * K + c[None, :], mask=mc, other=0)  # (BLOCK_R, KP)
    q_ptr = U + (offset + rows).to(tl.int64) * stride_m
    c_ptr = U + cand.to(tl.int64) * stride_m
    acc = tl.zeros((BLOCK_R, KP), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        mk = k < D
        q = tl.load(q_ptr[:, None] + k[None, :] * stride_d, mask=mr[:, None] & mk[None, :], other=0.0)
        x = tl.load(c_ptr[:, :, None] + k[None, None, :] * stride_d, mask=mc[:, :, None] & mk[None, None, :],
                    other=0.0)
        acc += tl.sum(q[:, None, :] * x, axis=2)
    tl.store(OUT + rows.to(tl.int64)[:, None] * K + c[None, :], acc, mask=mc)


def candidate_dots_triton(u, offset, n, cand):
    """(n, K) fp32: u[offset + i] · u[cand[i, c]] for the normalised fp32 set u (M, D) and candidates (n, K)."""
    K = cand.shape[1]
    D = u.shape[1]
    out = torch.empty((n, K), device=u.device, dtype=torch.float32)
    KP = max(2, triton.next_power_of_2(K))
    BLOCK_R = max(1, 64 // KP)
    BLOCK_D = max(16, min(64, triton.next_power_of_2(D)))
    _koleo_candidate_dots_kernel[(triton.cdiv(n, BLOCK_R),)](
        u, cand.contiguous(), out, n, K, D, offset, u.stride(0), u.stride(1), KP=KP, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out


@triton.jit
def _koleo_bwd_kernel(
    S, NORM, IDX, DIST, GRAD, GU,
    n, D, offset,
    stride_m, stride_d,
    eps, pdist_eps, scale,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # diff = u_i - u_j + pdist_eps, d = |diff|:  ∂u_i += c·diff, ∂u_j -= c·diff,  c = -g / (nK (d + eps) d)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < n
    grows = (offset + rows).to(tl.int64)
    d_i = tl.maximum(tl.load(NORM + grows, mask=mr, other=1.0), eps)
    coef = -tl.load(GRAD).to(tl.float32) * scale
    for k0 in range(0, D, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        m2 = mr[:, None] & (k < D)[None, :]
        xi = tl.load(S + grows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        ui = xi / d_i[:, None]
        g_i = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t in tl.static_range(TOPK):
            j = tl.load(IDX + rows.to(tl.int64) * TOPK + t, mask=mr, other=0)
            dist = tl.load(DIST + rows.to(tl.int64) * TOPK + t, mask=mr, other=1.0)
            c = tl.where(dist > 0, coef / ((dist + eps) * dist), 0.0)
            d_j = tl.maximum(tl.load(NORM + j, mask=mr, other=1.0), eps)
            xj = tl.load(S + j[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            g = tl.where(m2, c[:, None] * (ui - xj / d_j[:, None] + pdist_eps), 0.0)
            g_i += g
            # relaxed: GU is read by the next kernel only (acq_rel would fence every update).
            tl.atomic_add(GU + j[:, None] * D + k[None, :], -g, mask=m2, sem="relaxed")
        tl.atomic_add(GU + grows[:, None] * D + k[None, :], g_i, mask=m2, sem="relaxed")


@triton.jit
def _koleo_norm_bwd_kernel(S, NORM, GU, OUT, M, D, stride_m, stride_d, eps,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # u = s / max(|s|, eps):  ∂s = (∂u - u (u·∂u)) / |s|  if |s| > eps,  else ∂u / eps (the clamp holds the norm).
    # Written with u as F.normalize's backward is, so that e.g. d = 1 (u = ±1 exactly) gives exactly 0.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mr = rows < M
    nrm = tl.load(NORM + rows, mask=mr, other=1.0)
    den = tl.maximum(nrm, eps)
    cols = tl.arange(0, BLOCK_D)
    ug = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        m2 = mr[:, None] & (k < D)[None, :]
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        gu = tl.load(GU + rows[:, None] * D + k[None, :], mask=m2, other=0.0)
        ug += tl.sum((x / den[:, None]) * gu, axis=1)
    ug = tl.where(nrm > eps, ug, 0.0)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + cols
        m2 = mr[:, None] & (k < D)[None, :]
        x = tl.load(S + rows[:, None] * stride_m + k[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
        gu = tl.load(GU + rows[:, None] * D + k[None, :], mask=m2, other=0.0)
        gs = (gu - (x / den[:, None]) * ug[:, None]) / den[:, None]
        tl.store(OUT + rows[:, None] * D + k[None, :], gs.to(OUT.dtype.element_ty), mask=m2)


def koleo_bwd_triton(grad_loss, search, idx, dist, norm, offset, n, eps, pdist_eps):
    """Gradient of loss * grad_loss w.r.t. the search set (M, D), in search.dtype: O(n·K·D) work, three launches
    (zero fill, the distance gradient scattered with atomics, F.normalize's backward)."""
    M, D = search.shape
    K = idx.shape[1]
    g_u = torch.zeros((M, D), device=search.device, dtype=torch.float32)
    BLOCK_M = 16
    BLOCK_D = max(16, min(128, triton.next_power_of_2(D)))
    _koleo_bwd_kernel[(triton.cdiv(n, BLOCK_M),)](
        search, norm, idx, dist, grad_loss, g_u, n, D, offset, search.stride(0), search.stride(1),
        eps, pdist_eps, 1.0 / (n * K), TOPK=K, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
    )
    out = torch.empty((M, D), device=search.device, dtype=search.dtype)
    BLOCK_R = 16
    _koleo_norm_bwd_kernel[(triton.cdiv(M, BLOCK_R),)](
        search, norm, g_u, out, M, D, search.stride(0), search.stride(1), eps, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out
