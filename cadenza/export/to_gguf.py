"""llm → one GGUF file for llama.cpp, Ollama and LM Studio: llama-family models, written with the gguf package's
writer and tensor-name mapping, tensors in f32, f16, bf16 or q8_0 (the gguf package's quantizer), the tokenizer
and chat template in the metadata (gguf_vocab)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np

from ..errors import CadenzaError
from .gguf_vocab import add_tokenizer

DTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}  # transformers model_type → llama.cpp architecture


def write_gguf(model, tokenizer, path: Path, dtype: str, name: str) -> None:
    """Write the float32 causal LM `model` (adapter already merged) and its tokenizer to `path`."""
    config = model.config
    arch = _architecture(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    with tempfile.TemporaryDirectory() as folder:
        # SpecialVocab reads the saved files: tokenizer.json, tokenizer_config.json, chat template, config.json
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        add_tokenizer(writer, Path(folder), tokenizer, config.vocab_size)
    add_tensors(writer, model, arch, DTYPES[dtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _architecture(config) -> gguf.MODEL_ARCH:
    if config.model_type not in ARCHITECTURES:
        raise CadenzaError(f"GGUF export supports llama-family models ({', '.join(ARCHITECTURES)}); this model is "
                           f"{config.model_type!r} ({', '.join(config.architectures or [])}). Export it with "
                           "`-f safetensors` and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CadenzaError(f"GGUF export: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported "
                           "(only unscaled RoPE); export with `-f safetensors` instead")
    return ARCHITECTURES[config.model_type]


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta there
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tensors(writer: gguf.GGUFWriter, model, arch: gguf.MODEL_ARCH, qtype: gguf.GGMLQuantizationType) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp and transformers both reuse token_embd when there is no output.weight
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CadenzaError(f"GGUF export: tensor {name!r} has no {gguf.MODEL_ARCH_NAMES[arch]} GGUF name")
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            data = rotary_permute(data, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = rotary_permute(data, kv_heads)
        kind = tensor_type(data, qtype)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)


def rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp rotates each head's dimension pairs (i, i + d/2) as adjacent pairs (2i, 2i+1): Q and K rows are
    reordered to match, as its converter does (transformers' GGUF loader undoes this)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tensor_type(data: np.ndarray, requested: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norm vectors stay f32, as llama.cpp keeps them; a matrix whose rows do not split into whole quantization
    blocks falls back to f16."""
    if data.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[requested]
    if data.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return requested
