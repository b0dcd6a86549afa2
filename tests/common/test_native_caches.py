"""oneDNN's per-shape kernel caches stay bounded: a bfloat16 server met a new matrix shape at
nearly every step and grew by about 1 GB in 11 minutes (an auditor's soak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fedprefix.common.precision import cpu_native_bf16

GROWTH = """
import json, psutil, torch
import fedprefix.common  # sets the cache bounds, before any oneDNN kernel runs
torch.set_num_threads(1)
weight = torch.randn(1536, 576).bfloat16()
process = psutil.Process()
before = process.memory_info().rss
for rows in range(1, 401):  # 400 shapes, each new to the caches
    torch.nn.functional.linear(torch.randn(rows, 576).bfloat16(), weight)
print(json.dumps((process.memory_info().rss - before) / 2**20))
"""


@pytest.mark.skipif(not cpu_native_bf16(), reason="only oneDNN's native bfloat16 path caches a kernel per shape")
def test_a_new_matrix_shape_at_every_step_does_not_grow_memory_without_bound():
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", GROWTH], env=env, capture_output=True, text=True, timeout=300)
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    # unbounded: ~0.8 MiB a shape, 320 MiB here (EPYC); bounded: 64 kernels and torch's own buffers
    assert grown < 150, f"memory grew {grown:.0f} MiB over 400 matrix shapes"
