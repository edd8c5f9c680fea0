"""Torch modules of Matching Networks: the conv embedding, Full Context Embeddings, the network,
and an ensemble of trained networks."""

from .backbone import ConvEmbedding
from .ensemble import ensemble
from .fce import AttentionLSTM, SupportBiLSTM
from .matching import MatchingNetwork

__all__ = ["AttentionLSTM", "ConvEmbedding", "MatchingNetwork", "SupportBiLSTM", "ensemble"]
