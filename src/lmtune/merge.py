"""`lmtune merge`: fold a LoRA adapter into its base model, W' = W + (alpha / r) * B @ A, once.

The result is a plain Hugging Face folder (safetensors, config, generation config, tokenizer,
lmtune.json) that loads without peft and runs as fast as the base model. Before merging, every LoRA
matrix is checked against the module it adapts, so an adapter made for another base model is one
clear error rather than a shape mismatch deep inside peft.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmtune import files
from lmtune.config import MergeConfig
from lmtune.errors import LmtuneError


def check_out(out: str, overwrite: bool, inputs: list | None = None) -> bool:
    """Whether --out holds something (checked before any work): it may not be or hold an input, and what
    it holds is replaced only with --overwrite and only when lmtune wrote it."""
    files.check_outputs([("--out", out)], inputs or [])
    return files.check_replaceable(out, overwrite)


def save_swapped(model, tokenizer, out: str, meta: dict) -> Path:
    """Save the model into a temporary folder beside --out, then swap it in (the old one goes only then)."""
    from lmtune import models

    tmp = files.new_sibling(Path(out))
    with files.writing(f"--out {out}", tmp):
        models.save_model(model, tokenizer, tmp, meta)
    return files.swap_in(tmp, Path(out))


def adapter_base_name(adapter: Path) -> str:
    """The base model an adapter was trained on, as lmtune (or peft) recorded it."""
    from lmtune import models

    if not (adapter / "adapter_config.json").is_file():
        raise LmtuneError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json): "
                          "give the --out folder of `lmtune finetune --lora`")
    recorded = files.read_json(adapter / "adapter_config.json", "adapter file").get("base_model_name_or_path")
    return models.read_lmtune_file(str(adapter)).get("base_model") or recorded or ""


def check_adapter_fits(base, adapter: Path, base_name: str) -> None:
    """Every lora_A must take the adapted module's input size and every lora_B give its output size."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise LmtuneError(f"{adapter} has no adapter_model.safetensors: is the adapter complete?")
    modules = dict(base.named_modules())
    files.check_safetensors(weights)
    with files.loading(weights, "adapter weights"), safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            shape = tuple(f.get_slice(key).get_shape())
            module = modules.get(name)
            size = (getattr(module, "in_features", None), getattr(module, "out_features", None))
            got, want = (shape[1], size[0]) if ".lora_A." in key else (shape[0], size[1])
            if module is None or got != want:
                side = "input" if ".lora_A." in key else "output"
                where = f"has no module '{name}'" if module is None else \
                    f"has '{name}' with {size[0]}->{size[1]} features, the adapter expects {side} size {got}"
                trained_on = adapter_base_name(adapter) or "see its lmtune.json"
                raise LmtuneError(f"adapter {adapter} does not fit base model '{base_name}': the base {where}; "
                                  f"merge it into the model it was trained on ({trained_on})")


def dequantized_base(base_name: str):
    """A QLoRA adapter's base as it trained: loaded in NF4 as finetune --quantize 4bit loads it, then
    de-quantized to fp32, so the merged weights are the ones the adapter learnt against."""
    from lmtune import device, lora, models

    dev = device.resolve("auto")
    lora.check_4bit(dev)
    base, tokenizer, _ = models.load_for_task(base_name, "", "causal", quantize="4bit", device=dev)
    base = base.dequantize().float().cpu()
    base.hf_quantizer = None  # a plain model from here on (saved without quantization_config)
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    return base, tokenizer


def merge_adapter(base_name: str, adapter: Path):
    """(merged model, tokenizer, base name) for an adapter folder and a base model name."""
    from peft import PeftModel

    from lmtune import models

    named = adapter_base_name(adapter)
    base_name = base_name or named
    if not base_name:
        raise LmtuneError(f"adapter {adapter} does not name its base model: give --model BASE")
    if models.read_lmtune_file(str(adapter)).get("quantize") == "4bit":
        base, tokenizer = dequantized_base(base_name)
    else:
        base, tokenizer = models.load_causal_lm(base_name)
    if isinstance(base, PeftModel):
        raise LmtuneError(f"--model {base_name} is itself an adapter: give the base model it was trained on")
    check_adapter_fits(base, adapter, base_name)
    if named and named != base_name:
        try:
            same = models.resolve(named) == models.resolve(base_name)
        except LmtuneError:
            same = False
        if not same:  # shapes fit, so it will merge; the user may still have meant another base
            print(f"warning: adapter {adapter} was trained on '{named}', merging into '{base_name}' "
                  "(the shapes fit)", file=sys.stderr)
    with files.loading(adapter, "LoRA adapter", "check adapter_config.json, or train the adapter again"):
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if (adapter / "tokenizer_config.json").is_file():  # the adapter's own copy wins (it may add tokens)
        tokenizer = models.load_tokenizer(str(adapter))
    return merged, tokenizer, base_name


def merge(cfg: MergeConfig) -> Path:
    from lmtune import models

    adapter = Path(cfg.adapter)
    if not adapter.is_dir():
        raise LmtuneError(f"adapter folder {cfg.adapter} not found")
    named = adapter_base_name(adapter)  # checks it is an adapter before --out is touched
    check_out(cfg.out, cfg.overwrite, files.local_inputs(adapter=adapter, model=cfg.model or named,
                                                         config=getattr(cfg, "_config_file", "")))
    model, tokenizer, base_name = merge_adapter(cfg.model, adapter)
    meta = models.read_lmtune_file(str(adapter))
    out = save_swapped(model, tokenizer, cfg.out, {"task": meta.get("task"), "base_model": base_name,
                                                   "merged_adapter": str(adapter.resolve()), "lora": False})
    print(f"merged {adapter} into {base_name}: {out}", file=sys.stderr)
    return out
