"""Cadenza: declarative fine-tuning of large language models (generative `llm` and predictive `ecd`)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Model pulls in torch and transformers; importing it lazily keeps `cadenza render_config` and --help fast
    if name == "Model":
        from .api import Model

        return Model
    raise AttributeError(name)


__all__ = ["Model", "__version__"]
