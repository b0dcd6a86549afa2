"""The Flower ServerApp: rounds of local training, aggregation of the shared prefix only.

Modes (run config `mode`): `personal` (nothing aggregated; rounds schedule local
training and collect metrics), `shared` (one shared prefix, aggregated), and
`shared+personal` (the default). Settings: `[tool.flwr.app.config]` in pyproject.toml,
parsed by FederationConfig. The run folder (`run-dir`) is written as rounds end.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import torch
from fedprefix.common.base_model import load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.files import atomic_write_bytes
from fedprefix.common.precision import dtype_name, host_info, resolve_dtype
from fedprefix.common.prefix import Prefix
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file, save

from .records import SHARED_PREFIX_FILE, RunInfo, RunRecorder
from .strategy import PrefixStrategy, build_inner_strategy

log = logging.getLogger(__name__)
app = ServerApp()


def initial_shared_arrays(config: FederationConfig, base) -> ArrayRecord:
    """The round-0 shared prefix: the same text init every node would make, so nodes agree."""
    if not config.sends_shared:
        return ArrayRecord()
    from fedprefix.client.node import SHARED_KEY_PREFIX
    from fedprefix.client.personalizer import DEFAULT_INIT_TEXT

    text = " ".join([DEFAULT_INIT_TEXT] * (1 + config.shared_tokens // 16))
    shared = Prefix.from_text(base, text, config.shared_tokens)
    return ArrayRecord({SHARED_KEY_PREFIX + k: v.float().contiguous() for k, v in shared.state_tensors().items()})


def run_federation(grid: Grid, config: FederationConfig) -> None:
    """Run all rounds of `config` on `grid`, writing the run folder."""
    base = load_base(config.base)
    arrays = initial_shared_arrays(config, base)
    info = RunInfo(
        run_id=uuid.uuid4().hex[:12],
        status="running",
        config=config.model_dump(exclude={"key_seed"}),  # the simulation key seed is a secret
        base=config.base,
        base_fingerprint=base.fingerprint,
        shared_prefix_parameters=sum(int(torch.tensor(a.shape).prod()) for a in arrays.values()),
        compute_dtype=dtype_name(resolve_dtype(config.dtype, base.device)),
        host=host_info(base.device).model_dump(),
        started=time.time(),
    )
    recorder = RunRecorder(config.run_dir, info)
    strategy = PrefixStrategy(build_inner_strategy(config), config, arrays, base.fingerprint, recorder)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=config.num_rounds,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=strategy.end_round,
        )
    except BaseException as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if config.sends_shared and result.arrays is not None:
        save_shared_prefix(result.arrays, recorder.dir / SHARED_PREFIX_FILE)
    recorder.finish("finished")


def save_shared_prefix(arrays: ArrayRecord, path) -> None:
    """The final aggregated shared prefix (never a personal one) into the run folder."""
    tensors = {name: torch.from_numpy(array.numpy().copy()) for name, array in arrays.items()}
    atomic_write_bytes(path, save(tensors))


def load_shared_prefix(run_dir) -> dict[str, torch.Tensor]:
    """The final shared prefix of a run, as `shared.*` tensors."""
    return load_file(str(Path(run_dir) / SHARED_PREFIX_FILE))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`."""
    run_federation(grid, FederationConfig.from_run_config(dict(context.run_config)))
