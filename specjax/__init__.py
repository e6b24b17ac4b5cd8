"""specjax: lossless speculative decoding for Hugging Face language and vision-language models
in JAX.

The host API lives in `specjax.api` (generate, generate_stream, generate_pmap); the decode engine
in `specjax.engine`, drafters in `specjax.drafters`, model families in `specjax.models`.

    model = specjax.load_model("smollm2-135m")
    out = specjax.generate(model, "Hello!", max_new_tokens=64,
                           drafter=specjax.drafters.ngram())
"""

# autotune registers the drafter names that measure on the device ("auto", "*_sized", "*_gated").
from specjax import autotune, distributed, drafters
from specjax.api import GenerateOutput, decode_fn, generate, generate_pmap, generate_stream
from specjax.decode import DecodeFn
from specjax.engine.xla import xla_options
from specjax.model import Model, load_model, model_from_hf
from specjax.models.config import ModelConfig
from specjax.multimodal import VisionLanguageModel
from specjax.sharding import make_mesh, shard_model
from specjax.vision_cache import FeatureCache

__version__ = "0.1.0"
__all__ = [
    "DecodeFn",
    "FeatureCache",
    "Model",
    "VisionLanguageModel",
    "ModelConfig",
    "GenerateOutput",
    "autotune",
    "decode_fn",
    "distributed",
    "drafters",
    "generate",
    "generate_stream",
    "generate_pmap",
    "load_model",
    "make_mesh",
    "shard_model",
    "model_from_hf",
    "xla_options",
]
