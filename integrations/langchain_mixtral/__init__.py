"""LangChain integration for Mixtral-8x7B-Instruct: ``ChatMixtral`` and ``MixtralLLM`` over ``mixtral_client``."""

from .chat_models import ChatMixtral
from .llms import MixtralLLM

__all__ = ["ChatMixtral", "MixtralLLM"]
