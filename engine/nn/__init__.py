"""Torch modules of Matching Networks: the conv embedding, Full Context Embeddings, the network."""

from .backbone import ConvEmbedding
from .fce import AttentionLSTM, SupportBiLSTM
from .matching import MatchingNetwork

__all__ = ["AttentionLSTM", "ConvEmbedding", "MatchingNetwork", "SupportBiLSTM"]
