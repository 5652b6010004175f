"""pandas batches as raylm's per-row functions need them: text columns of Python strings.

Ray Data 2.60 hands `batch_format="pandas"` batches whose string columns are Arrow-backed
(`string[pyarrow]`). Reading one cell of such a column (`batch.at[i, "text"]`) goes through Arrow each
time, and in a loop over a batch's rows the time and the memory grow with rows x column size: on the scale
benchmark's 8 MB file (1,317 documents, one block) `pii_batch` took 19.9 s and a 6.6 GB peak where the same
rows as Python strings take 2.5 s and 0.33 GB. So every function that walks a batch row by row converts
the batch's string columns first (one pass; a batch built from Python lists is returned as it is).
"""

from __future__ import annotations

import pandas as pd


def python_strings(batch: pd.DataFrame) -> pd.DataFrame:
    """`batch` with its Arrow-backed string columns as object columns of Python strings."""
    arrow = [name for name, dtype in batch.dtypes.items()
             if isinstance(dtype, pd.StringDtype) or (isinstance(dtype, pd.ArrowDtype) and dtype.kind in "OSU")]
    if not arrow:
        return batch
    return batch.astype({name: object for name in arrow})
