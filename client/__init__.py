"""fedprefix.client: the on-device SDK and the Flower ClientApp."""

from .personalizer import Personalizer

__all__ = ["Personalizer"]
