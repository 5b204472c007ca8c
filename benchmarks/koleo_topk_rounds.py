"""How many top-k rounds a score tile costs the Triton KoLeo search (benchmarks/NOTES.md, KoLeo section 7).

    python benchmarks/koleo_topk_rounds.py

`_koleo_topk_merge` with EARLY_STOP inserts at most one candidate per row per round and runs while any row of the
tile still inserts, so a tile takes as many rounds as the most candidates any of its rows admits into its top-KC list.
That depends only on ranks, so iid uniform scores stand in for random features. Lists of the chunked search see every
tile of their split (about 43 at n = 16384); lists of the symmetric search only the 1-3 tiles of their program, on
both the rows' and the columns' side. CPU only, seconds.
"""

import numpy as np


def rounds_per_tile(tiles_per_list, kc, rows=128, width=128, reps=20, seed=0):
    """Mean rounds of the t-th tile a list sees, t = 0 .. tiles_per_list - 1."""
    rng = np.random.default_rng(seed)
    out = np.zeros(tiles_per_list)
    for _ in range(reps):
        best = np.full((rows, kc), -np.inf)
        for t in range(tiles_per_list):
            new = rng.random((rows, width))
            top = -np.sort(-np.concatenate([best, new], axis=1), axis=1)[:, :kc]
            out[t] += (new >= top[:, -1:]).sum(axis=1).max()
            best = top
    return out / reps


def main():
    cases = [("symmetric, fp32 topk 1 (KC 9), lists of 3 tiles", 3, 9),
             ("chunked, fp32 topk 1 (KC 9), lists of 43 tiles", 43, 9),
             ("symmetric, 16-bit topk 1 (KC 1), lists of 2 tiles", 2, 1),
             ("symmetric, 16-bit topk 4 (KC 4), lists of 2 tiles", 2, 4)]
    for label, tiles, kc in cases:
        r = rounds_per_tile(tiles, kc)
        head = ", ".join(f"{v:.2f}" for v in r[:5]) + (", ..." if tiles > 5 else "")
        print(f"{label}: rounds per tile {head}; mean {r.mean():.2f}")


if __name__ == "__main__":
    main()
