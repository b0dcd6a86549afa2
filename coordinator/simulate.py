"""Run a federation on this machine with Flower's Simulation Runtime, no Flower knowledge needed.

`fedprefix simulate` calls `simulate()`: the same ClientApp and ServerApp logic as
`flwr run .`, with N virtual nodes (one simulated persona user each) in this process.
"""

from __future__ import annotations

import logging
import os

from fedprefix.client.app import app as client_app
from fedprefix.common.config import FederationConfig
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from .app import run_federation
from .records import RoundRecord, read_run


def make_server_app(config: FederationConfig) -> ServerApp:
    """A ServerApp bound to `config` (the simulation runtime passes no run config)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config)

    return server_app


def simulate(
    config: FederationConfig,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    client_app: ClientApp = client_app,
) -> list[RoundRecord]:
    """Run `config` with `config.num_users` virtual nodes; returns the rounds recorded."""
    os.makedirs(config.run_dir, exist_ok=True)
    # Each virtual node trains with one thread: two cores, two nodes at a time, no oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose},
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(config),
        client_app=client_app,
        num_supernodes=config.num_users,
        backend_config=backend,
        verbose_logging=verbose,
    )
    info, rounds, _ = read_run(config.run_dir)
    if info.status != "finished":
        raise RuntimeError(f"simulation {info.status}: {info.error}")
    return rounds
