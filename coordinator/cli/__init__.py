"""The `fedprefix` command: the one thin layer allowed to call into client, coordinator and serving.

main.py        the app, --debug, the one error printer
base.py        fedprefix base list | fetch | info
federation.py  fedprefix simulate | runs | show | dashboard
serve.py       fedprefix serve
store.py       fedprefix store list | verify | rotate-key | export-peft
"""

from . import base, federation, serve, store  # noqa: F401  (each module registers its commands on the app)
from .main import app, run

__all__ = ["app", "run"]
