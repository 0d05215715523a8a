"""LoRA: a fresh adapter on a model for its task head, and QLoRA's 4-bit base (bitsandbytes NF4).

Loading a trained adapter with its base is `models.load_for_task`; folding one into the base is `merge`.
Both attach and load give the adapted layers `fused.fuse_lora`'s forward.
"""

from __future__ import annotations

import warnings

from lmtune.errors import LmtuneError, require

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every wrap: noise for users
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def attach_task_lora(model, head: str, r: int, alpha: float, dropout: float, targets: str):
    """LoRA for a task head. The new head (classifier/score, qa_outputs) is trained in full and saved
    with the adapter (modules_to_save): a frozen random head could not learn anything."""
    from peft import LoraConfig, get_peft_model

    task_type = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "qa_span": "QUESTION_ANS",
                 "seq2seq": "SEQ_2_SEQ_LM"}[head]
    heads = {"seq_cls": ["classifier", "score"], "qa_span": ["qa_outputs"]}.get(head)
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    keep = [h for h in heads if h in names] if heads else None
    target = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, task_type=task_type,
                     modules_to_save=keep)
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise LmtuneError(f"lora_targets '{targets}': {str(e).splitlines()[0]}") from None
    from lmtune.fused import fuse_lora

    fuse_lora(model)  # scale-and-add inside the matmul: no full-size temporaries per adapted layer
    return model


def attach_lora(model, r: int, alpha: float, dropout: float, targets: str):
    """Wrap a causal LM with a fresh LoRA adapter; only the adapter's weights need gradients."""
    return attach_task_lora(model, "causal", r, alpha, dropout, targets)


def bnb_4bit_config():
    """QLoRA's storage: NF4 weights, their scales quantized again (double quantization), bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes' CPU backend (0.50, on CPUs with AVX512-BF16) from repacking a 4-bit weight for
    inference at the first no-grad forward in eval mode (retention scoring, validation): from then on that
    layer's matmul has no backward, so no gradient reaches the layers below it, and their adapters stop
    learning without a word (measured: layer 0's LoRA-B gradients went from 0.007-0.45 to 0)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def check_4bit(dev) -> None:
    """A one-line error unless bitsandbytes is installed and can quantize on `dev` (CUDA; its CPU backend
    where the installed version has one), checked before any model is loaded."""
    import torch

    require("bitsandbytes", "gpu", "--quantize 4bit")
    try:
        import bitsandbytes.functional as bnb_f

        q, state = bnb_f.quantize_4bit(torch.randn(64, 64, device=dev, dtype=torch.bfloat16), quant_type="nf4",
                                       compress_statistics=True)
        bnb_f.dequantize_4bit(q, state)
    except Exception as e:  # noqa: BLE001 - whatever the backend raises, the user needs the same line
        raise LmtuneError(f"--quantize 4bit: bitsandbytes cannot run on {dev} here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:150] if str(e) else 'no backend'}); use a CUDA device "
                          "(--device cuda) or train without --quantize") from None
