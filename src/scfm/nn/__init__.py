"""Building blocks shared by the modules (attention, encoders, embeddings, latents)."""

from ._autobin import AutoDiscretizationEmbedding
from ._bert import (
    BertConfig,
    BertEncoder,
    BertLMHead,
    BertModel,
    get_activation,
    make_key_padding_mask,
)
from ._flowformer import FlowAttention, FlowformerEncoder, FlowformerLayer
from ._gmvae import GMVAELatent, VAELatent
from ._performer import FastAttention, Performer, PerformerModule, softmax_kernel
from ._retention import GatedLinearUnit, LowRankAdapter, MultiHeadRetention, RetentionLayer
from ._spatial_encoding import Sinusoidal2dPE, normalize_coordinates

__all__: list[str] = [
    "AutoDiscretizationEmbedding",
    "BertConfig",
    "BertEncoder",
    "BertLMHead",
    "BertModel",
    "FastAttention",
    "FlowAttention",
    "FlowformerEncoder",
    "FlowformerLayer",
    "GMVAELatent",
    "GatedLinearUnit",
    "LowRankAdapter",
    "MultiHeadRetention",
    "Performer",
    "PerformerModule",
    "RetentionLayer",
    "Sinusoidal2dPE",
    "VAELatent",
    "get_activation",
    "make_key_padding_mask",
    "normalize_coordinates",
    "softmax_kernel",
]
