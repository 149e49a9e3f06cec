"""The K2 / K2.5 network and its checkpoint loader; nothing here knows about serving."""

from swarmoe.model.kimi import KimiForCausalLM, KimiK25ForConditionalGeneration, build_model
from swarmoe.model.loader import Checkpoint, CheckpointError, load_model
from swarmoe.model.moe import RoutingStats

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "KimiForCausalLM",
    "KimiK25ForConditionalGeneration",
    "RoutingStats",
    "build_model",
    "load_model",
]
