"""Why llama.cpp's greedy continuations of lmtune's q8_0 export part from lmtune's: its two roundings, imitated.

`bench/gguf_roundtrip.py` finds llama.cpp agreeing with lmtune on 4 of 8 continuations of a q8_0 file even
when lmtune decodes the very weights the file holds. llama.cpp rounds two things lmtune does not: the input
of every quantized matmul (to 8-bit blocks of 32, `quantize_row_q8_0`: one fp16 scale, max|x| / 127, per
block) and its KV cache (f16 by default). This script exports SmolLM2-135M as q8_0 and compares llama.cpp
(default f16 cache, and f32) with lmtune's model on the file's weights, as it is and with each linear
layer's input rounded as llama.cpp rounds it (a forward pre-hook; Hugging Face's forward, one token at a
time). If both roundings account for the gap, the last row agrees on (nearly) every continuation.

    python bench/gguf_rounding.py          # about 1 min here; llama-cpp-python as for gguf_roundtrip.py
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gguf_roundtrip import (PROMPTS, compare, ensure_llama_cpp, export_gguf, file_weights,  # noqa: E402
                            llama_greedy, open_llama, teacher_forced)

TOKENS = 16


def q8_blocks(x):
    """`x` as llama.cpp's q8_0 matmul reads it: blocks of 32 along the last dim, round(x / d) * d, d =
    max|x| / 127 stored in fp16."""
    import torch

    b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, 1)), 0)
    return (q * d.half().float()).reshape(x.shape)


def reference(model, prompts: list[list[int]]) -> dict:
    """Greedy tokens and teacher-forced logits of `model` (Hugging Face's forward, the whole sequence each
    token: so that a hook on every linear layer sees every input)."""
    import torch

    ours = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ours.append(ids[len(p):])
    return {"ours": ours, "logits": teacher_forced(model, prompts, ours)}


def main() -> None:
    import torch

    llama_cpp = ensure_llama_cpp()
    from lmtune.export import load_merged
    from lmtune.tasks import instruct

    path = export_gguf("smollm2-135m", Path(tempfile.mkdtemp(prefix="lmtune-gguf-")) / "smollm2-135m-q8_0.gguf",
                       "q8_0")
    model, tok = load_merged("smollm2-135m")
    prompts = [tok(instruct.prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    held = file_weights(copy.deepcopy(model), "q8_0")
    refs = {"file's weights": reference(held, prompts)}
    for m in held.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda _, args: (q8_blocks(args[0]),))
    refs["file's weights, inputs rounded to q8_0"] = reference(held, prompts)
    print(f"\nq8_0 export of SmolLM2-135M; {len(PROMPTS)} chat prompts, {TOKENS} greedy tokens each\n")
    print(f"{'lmtune (fp32 arithmetic) on':<40} {'llama.cpp KV cache':<19} {'same greedy':>11} {'same top-1':>11}")
    for cache in ("f16", "f32"):
        kv = {} if cache == "f16" else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        llm = open_llama(llama_cpp, path, **kv)
        theirs = [llama_greedy(llm, p, TOKENS) for p in prompts]
        for label, ref in refs.items():
            equal, same, _ = compare(llm, prompts, theirs, ref)
            print(f"{label:<40} {cache + (' (default)' if cache == 'f16' else ''):<19} "
                  f"{f'{equal}/{len(PROMPTS)}':>11} {100 * same / (len(PROMPTS) * TOKENS):>10.1f}%")


if __name__ == "__main__":
    main()
