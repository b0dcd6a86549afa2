"""fedprefix.client: the on-device SDK and the Flower ClientApp."""

__all__ = ["Personalizer"]


def __getattr__(name: str):
    # Imported on first use: a Deployment Engine node starts a process per message, and the
    # ClientApp's SecAgg+ key-exchange messages need neither torch nor the model (client/app.py).
    if name == "Personalizer":
        from .personalizer import Personalizer

        return Personalizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
