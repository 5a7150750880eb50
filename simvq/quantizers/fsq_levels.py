"""FSQ levels for every power-of-two codebook size from 2**8 to 2**18.

The FSQ paper (Mentzer et al. 2023, arXiv 2309.15505, Table 1) recommends levels for five sizes only:
2**8 ``[8, 6, 5]``, 2**10 ``[8, 5, 5, 5]``, 2**12 ``[7, 5, 5, 5, 5]``, 2**14 ``[8, 8, 8, 6, 5]`` and
2**16 ``[8, 8, 8, 5, 5, 5]``, all levels >= 5 (which the paper found to work better than smaller ones).

Rule used for the other sizes: one more channel with 8 levels multiplies the codebook by exactly
2**3, so the rows for 2**8, 2**10 and 2**12 extend upwards by prepending 8s. The rule reproduces the
paper's own 2**14 row (``[8, 8] + [8, 6, 5]``) and 2**16 row (``[8, 8] + [8, 5, 5, 5]``), keeps every level
in 5..8 and keeps the relative error of the 2**8 / 2**10 / 2**12 row. 2**9, which no paper row reaches by
a multiple of 8, is ``[8, 8, 8]`` (exactly 512).

| size | levels | product | product / 2**k |
|---|---|---|---|
| 2**8 | 8, 6, 5 (paper) | 240 | 0.938 |
| 2**9 | 8, 8, 8 | 512 | 1.000 |
| 2**10 | 8, 5, 5, 5 (paper) | 1,000 | 0.977 |
| 2**11 | 8, 8, 6, 5 | 1,920 | 0.938 |
| 2**12 | 7, 5, 5, 5, 5 (paper) | 4,375 | 1.068 |
| 2**13 | 8, 8, 5, 5, 5 | 8,000 | 0.977 |
| 2**14 | 8, 8, 8, 6, 5 (paper) | 15,360 | 0.938 |
| 2**15 | 8, 7, 5, 5, 5, 5 | 35,000 | 1.068 |
| 2**16 | 8, 8, 8, 5, 5, 5 (paper) | 64,000 | 0.977 |
| 2**17 | 8, 8, 8, 8, 6, 5 | 122,880 | 0.938 |
| 2**18 | 8, 8, 7, 5, 5, 5, 5 | 280,000 | 1.068 |

Every product lies within a factor ``2**0.1`` (about 7%) of its target; the FSQ codebook has exactly
``prod(levels)`` codes, so report that number, not the power of two.
"""

from __future__ import annotations

# size -> levels; the five rows of the paper's Table 1 are kept as published
FSQ_LEVELS: dict[int, list[int]] = {
    2**8: [8, 6, 5],
    2**9: [8, 8, 8],
    2**10: [8, 5, 5, 5],
    2**11: [8, 8, 6, 5],
    2**12: [7, 5, 5, 5, 5],
    2**13: [8, 8, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**15: [8, 7, 5, 5, 5, 5],
    2**16: [8, 8, 8, 5, 5, 5],
    2**17: [8, 8, 8, 8, 6, 5],
    2**18: [8, 8, 7, 5, 5, 5, 5],
}

# the rows published in the paper (the others follow the rule in the module docstring)
FSQ_PAPER_SIZES: tuple[int, ...] = (2**8, 2**10, 2**12, 2**14, 2**16)
