"""Generative models (`model_type: llm`): base model loading (hub/folder/GGUF), prompts, tokenization and
padding-free packing, training through the shared trainer, generation, and artifacts."""

from .model import LlmModel

__all__ = ["LlmModel"]
