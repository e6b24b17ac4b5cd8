from specjax.models.config import ModelConfig, RopeScaling
from specjax.models.cache import KVCache, init_cache
from specjax.models.llama import forward, forward_hidden, full_logits, lm_head

__all__ = ["ModelConfig", "RopeScaling", "KVCache", "init_cache", "forward", "forward_hidden",
           "full_logits", "lm_head"]
