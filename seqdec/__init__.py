"""seqdec: fast sequence decoding in JAX / Flax NNX."""

from seqdec.checkpoints import CheckpointError, load_pretrained
from seqdec.decoding.spec import SpecConfig
from seqdec.errors import ConfigError, TreeError, UserError
from seqdec.generator import GenerationResult, Generator, PromptError
from seqdec.models.config import TransformerConfig
from seqdec.models.transformer import KVCache, Transformer, commit, init_cache
from seqdec.tokenizer import Tokenizer

__version__ = "0.1.0"
