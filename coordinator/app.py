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

import torch
from fedprefix.common.base_checks import check_base
from fedprefix.common.base_model import load_base
from fedprefix.common.config import FederationConfig
from fedprefix.common.precision import dtype_name, host_info, resolve_dtype
from fedprefix.common.prefix import Prefix
from fedprefix.common.protocol import init_text, pack_shared
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .records import RunInfo, RunRecorder, nothing_accepted, read_run, save_shared_prefix, this_process
from .strategy import PrefixStrategy, build_inner_strategy

log = logging.getLogger(__name__)
app = ServerApp()


def initial_shared_arrays(config: FederationConfig, base) -> ArrayRecord:
    """The round-0 shared prefix: the same text init every node would make, so nodes agree."""
    if not config.sends_shared:
        return ArrayRecord()
    shared = Prefix.from_text(base, init_text(base.tokenizer, config.shared_tokens), config.shared_tokens)
    return ArrayRecord(pack_shared(shared.state_tensors()))


def run_federation(grid: Grid, config: FederationConfig) -> None:
    """Run all rounds of `config` on `grid`, writing the run folder."""
    check_base(config.base, config.node_positions)  # as simulate does: every node would refuse rows past the context
    base = load_base(config.base)
    arrays = initial_shared_arrays(config, base)
    info = RunInfo(
        run_id=uuid.uuid4().hex[:12],
        status="running",
        # the simulation key seed is a secret; personal_init as it ran ("auto" resolved)
        config=config.model_dump(mode="json", exclude={"key_seed"}) | {"personal_init": config.personal_recipe},
        base=config.base,
        base_fingerprint=base.fingerprint,
        shared_prefix_parameters=sum(int(torch.tensor(a.shape).prod()) for a in arrays.values()),
        compute_dtype=dtype_name(resolve_dtype(config.dtype, base.device)),
        host=host_info(base.device).model_dump(mode="json"),
        started=time.time(),
        writer=this_process(),
    )
    recorder = RunRecorder.start(config.run_dir, info)
    strategy = PrefixStrategy(build_inner_strategy(config), config, arrays, base.fingerprint, recorder)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=config.num_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=strategy.end_round,
        )
        # inside the try: a full disk here must record the run as failed, not leave it "running"
        if config.sends_shared and result.arrays is not None:
            save_shared_prefix(result.arrays, recorder.dir)
        _, rounds, _ = read_run(recorder.dir)
    except (KeyboardInterrupt, SystemExit) as exc:  # `flwr stop`, a signal
        recorder.finish("interrupted", error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        raise
    except BaseException as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if problem := nothing_accepted(rounds):  # as simulate: a run that taught nobody anything has failed
        recorder.finish("failed", error=problem)
        raise RuntimeError(problem)
    recorder.finish("finished")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`."""
    run_federation(grid, FederationConfig.from_run_config(dict(context.run_config)))
