"""The HTTP shell around blt_runtime (FastAPI). Not built yet: see the issue "The HTTP server"."""
