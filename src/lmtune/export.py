"""`lmtune export`: a model (or base + LoRA adapter, merged first) as a GGUF file or a plain HF folder.

GGUF is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: `llama.*` hyperparameters,
tensors renamed by gguf's own name map (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`), the q and
k projections permuted from Hugging Face's rotate-half rotary layout back to the interleaved one GGUF
uses, 2-D weights in f16 or f32 and norms always in f32, and the byte-level BPE tokenizer (`gpt2`:
tokens, token types, merges, special ids, chat template). llama.cpp and transformers' GGUF loader
(`from_pretrained(folder, gguf_file=name)`) both read it.

`--quantize q8_0|q4_0|...` quantizes the 2-D weights with the gguf package's own quantizers
(`gguf.quants.quantize`, the code llama.cpp's convert_hf_to_gguf.py uses for --outtype q8_0); a matrix
whose rows are not whole blocks stays f16, and under 4-bit types the token embedding (tied to the output
layer, the most sensitive matrix) is q8_0. bench/gguf_roundtrip.py checks that llama.cpp runs the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmtune import files
from lmtune.config import ExportConfig
from lmtune.errors import LmtuneError

SUPPORTED = ("llama",)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # llama.cpp reads them all


def load_merged(name: str):
    """(model, tokenizer) for any model name; an adapter folder comes back merged into its base."""
    from lmtune import models

    path = Path(models.resolve(name))
    if (path / "adapter_config.json").is_file():
        from lmtune.merge import merge_adapter

        model, tokenizer, _ = merge_adapter("", path)
        return model, tokenizer
    return models.load_causal_lm(name)


def permute_rotary(w, n_head: int):
    """HF's q/k rows (per head: all real parts, then all imaginary) to GGUF's (pairs interleaved);
    transformers' loader undoes exactly this (`_reverse_permute_weights`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_architecture(cfg) -> None:
    rope = getattr(cfg, "rope_parameters", None) or {}
    why = None
    if cfg.model_type not in SUPPORTED:
        why = f"architecture '{cfg.model_type}' is not supported (only {', '.join(SUPPORTED)}: Llama, SmolLM2...)"
    elif rope.get("rope_type", "default") != "default":
        why = f"rope scaling '{rope.get('rope_type')}' is not supported"
    elif getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        why = "attention or MLP biases are not supported"
    if why:
        raise LmtuneError(f"cannot export to GGUF: {why}; use --format safetensors")


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise LmtuneError("cannot export to GGUF: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are "
                          "supported; use --format safetensors")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # plain GPT-2 split regex: what a bare ByteLevel pre-tokenizer does
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    specials = {writer.add_bos_token_id: tokenizer.bos_token_id, writer.add_eos_token_id: tokenizer.eos_token_id,
                writer.add_unk_token_id: tokenizer.unk_token_id, writer.add_pad_token_id: tokenizer.pad_token_id}
    for add, token_id in specials.items():
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def ggml_type(name: str):
    """The gguf.GGMLQuantizationType for --quantize/--dtype NAME, if the gguf package can write it; else
    a one-line error (checked before any model is loaded)."""
    import gguf
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, name.upper(), None) if name.lower() in GGUF_TYPES else None
    try:
        if qtype is None:
            raise NotImplementedError
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        raise LmtuneError(f"--quantize {name}: lmtune cannot write this GGUF type with the gguf package "
                          f"(v{_gguf_version()}); use one of {', '.join(GGUF_TYPES)} (K-quants: llama.cpp's "
                          "llama-quantize on an f16 export)") from None
    return qtype


def _gguf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("gguf")


def weight_data(data, qtype, gguf_name: str):
    """(floats, or quantized bytes; raw shape; raw type) of one tensor for GGUFWriter.add_tensor."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim != 2:  # norms stay f32, as llama.cpp keeps them
        return data, None, None
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1) and gguf_name == "token_embd.weight":
        qtype = T.Q8_0
    if qtype not in (T.F32, T.F16) and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = T.F16  # rows that are not whole blocks: f16, as convert_hf_to_gguf.py falls back
    if qtype == T.F32:
        return data, None, None
    if qtype == T.F16:
        return data.astype(np.float16), None, None
    return gguf.quants.quantize(data, qtype), None, qtype  # bytes; the writer derives the shape from them


def write_gguf(model, tokenizer, path: Path, dtype: str, name: str) -> None:
    import gguf
    import numpy as np

    qtype = ggml_type(dtype)

    cfg = model.config
    check_architecture(cfg)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    file_type = "ALL_F32" if dtype == "f32" else f"MOSTLY_{dtype.upper()}"
    if hasattr(gguf.LlamaFileType, file_type):
        w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    write_tokenizer(w, tokenizer, cfg.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # no output.weight: readers tie it to token_embd
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LmtuneError(f"cannot export to GGUF: no GGUF name for tensor '{hf_name}'; use --format safetensors")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, kv_heads)
        data, raw_shape, raw_dtype = weight_data(data, qtype, gguf_name)
        w.add_tensor(gguf_name, np.ascontiguousarray(data), raw_shape=raw_shape, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export(cfg: ExportConfig) -> Path:
    from lmtune import models
    from lmtune.merge import check_out, save_swapped

    out = Path(cfg.out)
    if cfg.format == "gguf" and out.suffix != ".gguf":
        raise LmtuneError(f"--out {cfg.out}: a GGUF export needs a file name ending in .gguf")
    if cfg.format == "gguf" and out.is_dir():
        raise LmtuneError(f"--out {cfg.out} is a folder: a GGUF export writes one file; give FILE.gguf")
    if cfg.format == "safetensors" and (out.is_file() or out.suffix == ".gguf"):
        raise LmtuneError(f"--out {cfg.out}: --format safetensors writes a folder; give a folder name")
    check_out(cfg.out, cfg.overwrite, files.local_inputs(model=cfg.model, config=getattr(cfg, "_config_file", "")))
    gguf_type = (cfg.quantize or cfg.dtype).lower()
    if cfg.format == "gguf":
        ggml_type(gguf_type)
    elif cfg.quantize:
        raise LmtuneError("--quantize is for --format gguf; a safetensors export keeps the model's weights")
    model, tokenizer = load_merged(cfg.model)
    if cfg.format == "safetensors":
        meta = models.read_lmtune_file(models.resolve(cfg.model))
        out = save_swapped(model, tokenizer, cfg.out, {"task": meta.get("task"), "exported_from": cfg.model})
    else:
        check_architecture(model.config)
        with files.writing(f"--out {out}"):
            out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")  # never leave a half-written .gguf where a reader looks
        with files.writing(f"--out {out}", tmp):
            write_gguf(model, tokenizer, tmp, gguf_type, Path(cfg.model).name or cfg.model)
            tmp.replace(out)
    print(f"exported {cfg.model} to {out} ({cfg.format}{', ' + gguf_type if cfg.format == 'gguf' else ''})",
          file=sys.stderr)
    return out
