"""Load the model and run the app under uvicorn (what `cadenza serve` does once its flags are read)."""

from __future__ import annotations

import sys

from ..errors import CadenzaError
from .settings import ServeSettings


def _web_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CadenzaError(f"cadenza serve needs the serve extra ({e.name} is not installed): "
                           "pip install 'cadenza[serve]'") from None
    return uvicorn


def serve(model_path: str, settings: ServeSettings, *, host: str, port: int, log_level: str = "info") -> None:
    uvicorn = _web_stack()
    from ..api import Model
    from .app import build_app
    from .guards import exposure_warning

    model = Model.load(model_path)  # a CadenzaError (bad folder) reaches the CLI, which prints it and exits 2
    app = build_app(model, settings)
    routes = "/, /predict, /batch_predict, /metrics"
    if model.config.model_type == "llm":
        routes += ", /v1/models, /v1/chat/completions, /v1/completions"
    print(f"serving the {model.config.model_type} model {model_path} as {settings.model_name!r}: {routes}"
          f"{'; API key required' if settings.api_key else ''}", flush=True)
    warning = exposure_warning(host, settings.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=settings.max_connections)
