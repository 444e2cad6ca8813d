"""LangChain integration for Mixtral-8x7B-Instruct: ``ChatMixtral`` over ``mixtral_client``."""

from .chat_models import ChatMixtral

__all__ = ["ChatMixtral"]
