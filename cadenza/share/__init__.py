"""Sharing: Hugging Face Hub upload/download and model cards."""
