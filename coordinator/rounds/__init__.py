"""Round management: opening, selecting participants, closing and finalizing rounds."""

from coordinator.rounds.manager import RoundManager

__all__ = ["RoundManager"]
