"""Inference-time defenses that stack with each other and with ReGap-trained models."""

from regap.defenses import adashield, coca, ecso  # noqa: F401  (registration)
from regap.defenses.base import (
    DefendedResult,
    Defense,
    available_defenses,
    build_generate,
    get_defense,
    plain_generate,
    register_defense,
)

__all__ = ["DefendedResult", "Defense", "available_defenses", "build_generate", "get_defense", "plain_generate",
           "register_defense"]
