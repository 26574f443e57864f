"""`dgemma serve`: an OpenAI-compatible server with a batching engine worker, draft streaming and a web page.

    protocol.py     request / response types (pydantic)
    settings.py     server settings (the CLI flags)
    errors.py       OpenAI error JSON and status codes
    metrics.py      Prometheus text exposition
    engine.py       the worker thread that owns the Engine and batches rows step by step
    completions.py  requests -> engine jobs, engine events -> responses and SSE chunks
    app.py          routes, auth, SSE, the web page
    batch.py        OpenAI Batch files answered through the app in process (`dgemma run-batch`)
    batch_api.py    OpenAI's Files and Batches APIs on the server (--batch-dir): background rows, resumable
    static/         the live-canvas web page (no build step)
"""

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(pipeline, settings: ServerSettings | None = None):
    from .app import create_app as _create

    return _create(pipeline, settings)
