"""Values every layer shares, kernels included; this module imports nothing.

``NO_LABEL``: the label no vocabulary column has (int64's minimum). It is the ignore_index the
operators run with where the caller has none (then no position matches it), the label of a
position TRL's ``row_mask`` switches off, and the local label of an ignored row on a
vocabulary-parallel rank (where the caller's ignore_index may be a valid local id).
"""

NO_LABEL = -(2**63)
