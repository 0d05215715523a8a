"""Does llama.cpp run what `lmtune export --format gguf` writes? For SmolLM2-135M and a LoRA merged into it,
each of f16, q8_0 and q4_0: export, load the file with llama.cpp (llama-cpp-python), and compare its greedy
continuation of 8 chat prompts with lmtune's (`lmtune.generation.decoder`, fp32 arithmetic), token for token,
twice: against lmtune decoding the fp32 model ("= fp32"), and against lmtune decoding the very weights the
file holds (export's own rounding, then gguf's dequantizer: "= file"). The second asks what the bench is
for, whether llama.cpp runs the exported model as lmtune runs it; the first adds the rounding the chosen
type makes.

    python bench/gguf_roundtrip.py                 # installs llama-cpp-python if missing (requirements-bench.txt)
    python bench/gguf_roundtrip.py --tokens 8 --types f16,q8_0

Required, on "= file": f16 equal on 8 of 8 prompts, q8_0 on at least 7 of 8 (q4_0 is reported, not
required); and a control, where nothing is rounded: an f32 export, read with llama.cpp's KV cache in f32
as well, equal on 8 of 8 and on every next token. Also checked: llama.cpp's tokenizer, read from the GGUF,
gives the same ids as the Hugging Face one. Two more columns, against "= file", say how far apart the two
are where greedy strings part, as llama.cpp's own `llama-perplexity --kl-divergence` judges a quantized
file: "same top-1" feeds llama.cpp lmtune's greedy tokens (teacher forcing) and counts the positions where
both pick the same next token; "margin" is the largest gap between lmtune's two best logits at a token
where a greedy continuation first differs (a small one is a near-tie, which any change in arithmetic can
flip).
llama-cpp-python compiles llama.cpp from source (minutes); with a wheel built once (`pip wheel
llama-cpp-python -w DIR`), `PIP_FIND_LINKS=DIR` makes pip use it.
Exit 1 if a required row fails.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colours.",
           "Explain what a CPU does in one sentence.", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?", "Give me a tip for learning Python.", "Rewrite 3 May 2021 as YYYY-MM-DD."]
NEEDED = {"f16": 8, "q8_0": 7}


def ensure_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        print("installing llama-cpp-python (builds llama.cpp unless PIP_FIND_LINKS has a wheel)...", flush=True)
        line = next(r for r in (ROOT / "requirements-bench.txt").read_text().splitlines() if r.startswith("llama"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", line.split("#")[0].strip()], check=True)
    import llama_cpp

    return llama_cpp


def random_lora(out: Path) -> Path:
    """A LoRA adapter on SmolLM2 with random, non-zero A and B (small, so that the model stays coherent),
    saved as finetune saves one: exporting it merges it into the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lmtune import models

    base, tok = models.load_causal_lm("smollm2-135m")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    out.mkdir(parents=True, exist_ok=True)
    models.save_model(model, tok, out, {"base_model": "smollm2-135m", "task": "instruct", "lora": True})
    return out


def lmtune_reference(model, pad_id: int, prompts: list[list[int]], n: int) -> dict:
    """lmtune's greedy tokens ("ours") for `model` (its decoder, fp32), one prompt at a time, and its
    next-token logits (n, vocab) at each of them, prompt and continuation fed whole (teacher forcing)."""
    from lmtune.generation.decoder import Decoder

    decoder = Decoder(model)
    ours = [decoder.generate([p], n, eos_ids=(), pad_id=pad_id)[0].tolist() for p in prompts]
    return {"ours": ours, "logits": teacher_forced(model, prompts, ours)}


def teacher_forced(model, prompts: list[list[int]], ours: list[list[int]]) -> list:
    """`model`'s next-token logits (n, vocab) at each token of `ours`, prompt and continuation fed whole."""
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)].float()
                for p, c in zip(prompts, ours)]


def export_gguf(name: str, path: Path, qtype: str) -> Path:
    """`lmtune export --format gguf` of model `name` to `path`, as a user runs it."""
    from lmtune.cli import main as lmtune_main

    try:
        lmtune_main(["export", "--model", name, "--out", str(path), "--quantize", qtype, "--overwrite"])
    except SystemExit as e:
        if e.code:
            raise
    return path


def open_llama(llama_cpp, path: Path, **kv):
    """llama.cpp reading the GGUF file `path`, on every core; `kv`: more `Llama` settings (the KV cache's types)."""
    # logits_all: without it llama-cpp-python 0.3.36 leaves `scores` of the last evaluated position at
    # zero, and every argmax read there is token 0
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False,
                           logits_all=True, **kv)


def file_weights(model, qtype: str):
    """`model` with each matrix set to what an export of type `qtype` stores for it (export's own
    `weight_data`, then gguf's dequantizer): the model the file holds, for lmtune to decode in fp32. Norms
    stay fp32 in every file. The rotary row permutation that export applies to q/k moves whole rows, and
    every type rounds within a row, so rounding here in Hugging Face's row order gives the same values."""
    import gguf
    import numpy as np
    import torch

    from lmtune import export

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    t = export.ggml_type(qtype)
    with torch.no_grad():
        for hf_name, p in model.named_parameters():  # a tied output layer is the embedding, named once
            if p.ndim != 2:
                continue
            data, _, raw = export.weight_data(p.detach().float().numpy(), t,
                                              names.get_name(hf_name, try_suffixes=(".weight", ".bias")))
            back = data.astype(np.float32) if raw is None else gguf.quants.dequantize(data, raw)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back.reshape(p.shape), dtype=np.float32)))
    return model


def compare(llm, prompts, theirs: list[list[int]], ref: dict) -> tuple[int, int, float]:
    """(greedy continuations equal, positions with the same top-1 under teacher forcing, the largest
    lmtune margin at a first difference; 0.0 when none differs) of the llama.cpp model `llm`, whose
    greedy continuations are `theirs`, against lmtune's reference `ref`."""
    import numpy as np

    equal, same, margin = 0, 0, 0.0
    for p, t, o, lg in zip(prompts, theirs, ref["ours"], ref["logits"]):
        if t == o:
            equal += 1
        else:
            k = next(i for i, (a, b) in enumerate(zip(t, o)) if a != b)
            top = lg[k].topk(2).values
            margin = max(margin, float(top[0] - top[1]))
        llm.reset()
        llm.eval(p + o[:-1])
        forced = np.asarray(llm.scores[len(p) - 1:len(p) - 1 + len(o)]).argmax(-1)
        same += int((forced == np.asarray(o)).sum())
    return equal, same, margin


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    got = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(t)
        llm.eval([t])
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--out", default="", help="folder for the exported files (default: a temporary one)")
    args = ap.parse_args()
    llama_cpp = ensure_llama_cpp()
    from lmtune.export import load_merged
    from lmtune.tasks import instruct

    work = Path(args.out or tempfile.mkdtemp(prefix="lmtune-gguf-"))

    def judge(path: Path, src: dict, held: dict, **kv) -> tuple[bool, int, int, int, float]:
        """(same tokenizer ids, greedy equal to lmtune fp32, greedy equal to lmtune on the file's weights
        `held`, and against those: same top-1, margin) of llama.cpp reading `path`."""
        llm = open_llama(llama_cpp, path, **kv)
        same_tok = all(llm.tokenize(t.encode(), add_bos=False, special=True) == p
                       for t, p in zip(src["texts"], src["prompts"]))
        theirs = [llama_greedy(llm, p, args.tokens) for p in src["prompts"]]
        fp32_equal = sum(t == o for t, o in zip(theirs, src["fp32"]["ours"]))
        return (same_tok, fp32_equal, *compare(llm, src["prompts"], theirs, held))

    sources = {"smollm2-135m": "smollm2-135m", "smollm2-135m + LoRA": str(random_lora(work / "lora"))}
    types = args.types.split(",")
    refs, rows, failed = {}, [], False
    for label, name in sources.items():
        model, tok = load_merged(name)  # as export reads it: an adapter merged
        texts = [instruct.prompt_text(tok, p) for p in PROMPTS]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        held = {q: lmtune_reference(file_weights(copy.deepcopy(model), q), tok.pad_token_id, prompts, args.tokens)
                for q in types}
        src = refs[label] = {"texts": texts, "prompts": prompts,
                             "fp32": lmtune_reference(model, tok.pad_token_id, prompts, args.tokens)}
        for qtype in types:
            path = export_gguf(name, work / f"{label.replace(' + ', '-').replace(' ', '')}-{qtype}.gguf", qtype)
            result = judge(path, src, held[qtype])
            need = NEEDED.get(qtype)
            ok = need is None or result[2] >= need
            failed |= not ok
            rows.append((label, qtype, path.stat().st_size / 2**20, *result, need, ok))
    # reference: the very GGUF file lmtune's smollm2-135m comes from (its fp32 weights are exactly this
    # file's Q4_1 blocks, so the weights it holds are lmtune's fp32 ones), run by llama.cpp: how far
    # llama.cpp's quantized arithmetic alone moves greedy choices, with no export in between
    sys.path.insert(0, str(ROOT / "bench"))
    from serve import gguf_file

    base = refs["smollm2-135m"]
    original = Path(gguf_file())
    rows.append(("original (not exported)", "q4_1", original.stat().st_size / 2**20,
                 *judge(original, base, base["fp32"]), None, True))
    # control: an f32 export, read with llama.cpp's KV cache in f32 too (its default is f16), so that nothing
    # on either side is rounded below fp32: what is left is the export itself, and it must agree throughout
    path = export_gguf("smollm2-135m", work / "smollm2-135m-f32.gguf", "f32")
    result = judge(path, base, base["fp32"], type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    positions = len(PROMPTS) * args.tokens
    ok = result[0] and result[2] == len(PROMPTS) and result[3] == positions
    failed |= not ok
    rows.append(("f32 + f32 KV (control)", "f32", path.stat().st_size / 2**20, *result, 8, ok))
    print(f"\nllama-cpp-python {llama_cpp.__version__}; greedy continuations of {len(PROMPTS)} chat prompts, "
          f"{args.tokens} tokens each, equal to lmtune decoding its fp32 model (= fp32) and to lmtune decoding "
          f"the weights the file holds (= file; required rows are judged by it; same top-1 and margin against "
          f"it too)\n")
    print(f"{'model':<23} {'type':<6} {'file MB':>8} {'tokenizer':>10} {'= fp32':>7} {'= file':>7} {'needed':>7} "
          f"{'same top-1':>11} {'margin':>7}  result")
    for label, qtype, mb, same_tok, fp32_equal, agree, same, margin, need, ok in rows:
        print(f"{label:<23} {qtype:<6} {mb:>8.1f} {'same' if same_tok else 'DIFFERS':>10} "
              f"{f'{fp32_equal}/{len(PROMPTS)}':>7} {f'{agree}/{len(PROMPTS)}':>7} {need if need else '-':>7} "
              f"{100 * same / positions:>10.1f}% {margin:>7.3f}  {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
