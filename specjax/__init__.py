"""specjax: lossless speculative decoding for Hugging Face language models in JAX."""
from specjax.model import Model, load_model, model_from_hf
from specjax.models.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "load_model", "model_from_hf"]
