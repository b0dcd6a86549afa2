"""fedprefix.client: the on-device SDK and the Flower ClientApp."""

__all__ = ["Personalizer", "write_key_file"]


def __getattr__(name: str):
    # Imported on first use: a Deployment Engine node starts a process per message, and the
    # ClientApp's SecAgg+ key-exchange messages need neither torch nor the model (client/app.py).
    if name == "Personalizer":
        from .personalizer import Personalizer

        return Personalizer
    if name == "write_key_file":
        from fedprefix.common.store.key_files import write_key_file

        return write_key_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion sees the lazily imported names too
    return sorted({*globals(), *__all__})
