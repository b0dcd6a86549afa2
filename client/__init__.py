"""fedprefix.client: the on-device SDK and the Flower ClientApp."""
