"""Inference-time defenses that stack with each other and with ReGap-trained models."""

from regap.defenses import adashield, cmrm, coca, ecso, layer0_align  # noqa: F401  (registration)
from regap.defenses.base import (
    DEFENSES,
    DefendedResult,
    Defense,
    Intervention,
    available_defenses,
    build_generate,
    check_option,
    check_strength,
    get_defense,
    parse_spec,
    plain_generate,
    register_defense,
    strength_option,
)

__all__ = ["DEFENSES", "DefendedResult", "Defense", "Intervention", "available_defenses", "build_generate",
           "check_option", "check_strength", "get_defense", "parse_spec", "plain_generate", "register_defense",
           "strength_option"]
