"""fedprefix.common: what both the device and the coordinator need (no networking)."""

import os

# oneDNN keeps a compiled kernel of about 0.7 MiB per matrix shape, in two caches of 1,024
# entries each (ideep's and its own). bfloat16 serving and training meet new shapes at nearly
# every step (rows, packed tokens, positions): a server grew by about 1 GB in 11 minutes
# (EPYC, native bf16). 64 entries keep every shape a run of steps reuses, and a miss costs
# ~0.7 ms. Read by torch on first use, so set on import, before any model runs; a value
# already in the environment is the user's.
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
