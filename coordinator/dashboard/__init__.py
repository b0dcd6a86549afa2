"""The read-only web dashboard of federated runs (FastAPI, server-rendered HTML, inline SVG)."""
