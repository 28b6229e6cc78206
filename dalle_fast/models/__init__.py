"""The models: nn.Modules that take tensors (the dVAE, the transformer with its key/value cache, the
CLIP reranker, the judge of caption fidelity). They import the ops and nothing above them."""

from dalle_fast.models.clip import CLIP, CLIPConfig
from dalle_fast.models.dvae import DVAE, DVAEConfig
from dalle_fast.models.kv_cache import KVCache
from dalle_fast.models.transformer import DALLE, TransformerConfig, preset

__all__ = ["CLIP", "CLIPConfig", "DALLE", "DVAE", "DVAEConfig", "KVCache", "TransformerConfig", "preset"]
