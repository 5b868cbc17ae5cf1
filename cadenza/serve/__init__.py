"""`cadenza serve`: a loaded model behind Ludwig's REST routes and, for llm models, OpenAI-compatible ones.

Importing this package is cheap (argparse only): FastAPI, uvicorn and torch load when the command runs.
See docs/serve.md."""

from .command import register_cli

__all__ = ["register_cli"]
