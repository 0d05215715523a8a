"""Quality benchmark: fine-tune and evaluate on ../shared/data, print lmtune's figure beside the published one.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py --minutes 3 --threads 2        # everything
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py --only sst2,wikitext2 --minutes 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py --budget 10m,30m --gen-rows 0   # against a peer
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py --budget 10m --tasks sst2,xquad

With --budget, each budget runs each of --tasks with lmtune's recipe (configs/) and finetune's own --budget,
and with the Hugging Face Trainer's defaults on the same model and the examples lmtune's task encodes, stopped
by the clock; both scored by lmtune's evaluate. multi30k (English -> German, scratch:10m, test2016 BLEU,
--gen-rows 0: all) also runs lmtune's other route, SmolLM2-135M with LoRA; sst2 (MiniLM-L6, GLUE dev accuracy)
xquad (MiniLM-L6 span head, F1 on the last 9 of 36 XQuAD-en articles, the first 27 train) and instruct
(SmolLM2-135M-Instruct LoRA on Alpaca against TRL's SFTTrainer with its defaults, the loss on the responses of
the 50 held-back records). --contenders picks some of recipe, trainer (the peer), pretrained.

Each fine-tune gets a CPU budget of --minutes of training: a 2-step probe measures the time a step takes
here, and the run takes as many steps as fit in the budget (model loading and evaluation are extra; the
table's wall time counts everything). Evaluation sets that need generation are cut to --gen-rows rows.
Published figures come from full training on GPUs: the point is the gap at a given CPU budget.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


class Row(NamedTuple):
    """One contender's score at one budget; role says which side of the comparison it is on."""
    bench: str
    who: str
    value: float
    published: str
    wall: float  # seconds of loading, training and saving (scoring not counted)
    role: str  # "recipe" (lmtune's config), "peer" (the Trainer or TRL at the same budget), "other"


def _finetune(budget_min: float, work: Path, name: str, **kw) -> Path:
    """finetune with as many steps as fit in the budget (measured by a 2-step probe)."""
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune
    from lmtune.track import read_metrics

    probe = work / f"{name}-probe"
    finetune(FinetuneConfig(out=str(probe), max_steps=2, save_every=10_000, **kw))
    per_step = read_metrics(probe)[-1]["elapsed_s"] / 2
    steps = max(2, int(budget_min * 60 / per_step))
    print(f"[{name}] {per_step:.2f} s/step here: {steps} steps in {budget_min} min", file=sys.stderr)
    out = work / name
    finetune(FinetuneConfig(out=str(out), max_steps=steps, save_every=10_000, warmup_steps=min(20, steps // 10),
                            **kw))
    return out


def _evaluate(model: str, task: str, data: str, **kw) -> dict:
    from lmtune.config import EvaluateConfig
    from lmtune.evaluate import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(EvaluateConfig(model=model, task=task, data=data, **kw))


def _xquad_split(work: Path) -> tuple[str, str]:
    """XQuAD English split by article (no context shared): the first 27 articles train, the last 9 dev."""
    data = json.loads((DATA / "xquad" / "xquad.en.train.json").read_text())["data"]
    paths = []
    for name, arts in (("train", data[:27]), ("dev", data[27:])):
        p = work / f"xquad.{name}.json"
        p.write_text(json.dumps({"version": "1.1", "data": arts}))
        paths.append(str(p))
    return paths[0], paths[1]


def sst2(a, work: Path) -> list[tuple]:
    # SST-2 train is sorted by nothing useful for a few hundred rows, so sample rows with a fixed seed
    lines = (DATA / "sst2" / "train.tsv").read_text().splitlines(True)
    rows = random.Random(0).sample(lines[1:], min(len(lines) - 1, 20_000))
    train = work / "sst2.train.tsv"
    train.write_text(lines[0] + "".join(rows))
    model = _finetune(a.minutes, work, "sst2", task="classify", model="minilm-l6", data=str(train),
                      text_column="sentence", batch_size=32, learning_rate=1e-4, max_length=64, threads=a.threads)
    r = _evaluate(str(model), "classify", str(DATA / "sst2" / "dev.tsv"), text_column="sentence", max_length=128)
    return [("SST-2 dev accuracy", "minilm-l6 full", r["accuracy"], "DistilBERT 91.3, MiniLM-L12 93.0")]


def multi30k(a, work: Path) -> list[tuple]:
    m = DATA / "multi30k"
    pairs = []  # the first 2,000 training pairs: a CPU budget of minutes sees a few hundred at most
    for lang in ("en", "de"):
        lines = gzip.open(m / f"train.{lang}.gz", "rt", encoding="utf-8").read().split("\n")[:2000]
        (work / f"train.{lang}").write_text("\n".join(lines) + "\n")
        pairs.append(str(work / f"train.{lang}"))
    model = _finetune(a.minutes, work, "multi30k", task="translate", model="smollm2-135m", lora=True,
                      data=",".join(pairs), batch_size=8, learning_rate=1e-3,
                      max_length=160, threads=a.threads)
    r = _evaluate(str(model), "translate", f"{m / 'test_2016_flickr.en.gz'},{m / 'test_2016_flickr.de.gz'}",
                  limit=a.gen_rows, max_new_tokens=48, batch_size=16)
    return [(f"Multi30k en-de test2016 BLEU (first {r['rows']})", "smollm2-135m LoRA", r["bleu"],
             "Transformers from scratch: about 30-35")]


def xquad_extractive(a, work: Path) -> list[tuple]:
    train, dev = _xquad_split(work)
    model = _finetune(a.minutes, work, "xquad-ext", task="qa", model="minilm-l6", data=train, batch_size=16,
                      learning_rate=1e-4, max_length=256, doc_stride=64, threads=a.threads)
    r = _evaluate(str(model), "qa", dev, max_length=256, doc_stride=64)
    return [(f"XQuAD-en dev F1/EM ({r['rows']} q.)", "minilm-l6 extractive", f"{r['f1']:.1f}/{r['exact_match']:.1f}",
             "mBERT 83.5/72.2 (after SQuAD)")]


def xquad_generative(a, work: Path) -> list[tuple]:
    train, dev = _xquad_split(work)
    model = _finetune(a.minutes, work, "xquad-gen", task="qa", model="smollm2-135m", lora=True, data=train,
                      batch_size=4, learning_rate=1e-3, max_length=384, threads=a.threads)
    r = _evaluate(str(model), "qa", dev, limit=a.gen_rows, max_new_tokens=24, batch_size=8)
    return [(f"XQuAD-en dev F1/EM ({r['rows']} q.)", "smollm2-135m generative",
             f"{r['f1']:.1f}/{r['exact_match']:.1f}", "mBERT 83.5/72.2 (after SQuAD)")]


def wikitext2(a, work: Path) -> list[tuple]:
    r = _evaluate("smollm2-135m", "lm", str(DATA / "wikitext2" / "wiki.valid.tokens"), limit=a.lm_lines,
                  max_length=512, stride=256)
    return [(f"WikiText-2 valid perplexity ({r['tokens']} tok.)", "smollm2-135m zero-shot", r["perplexity"],
             "GPT-2 117M 29.41 (test, word-level)")]


def _multi30k_files(work: Path, split: str, rows: int = 0) -> str:
    """SRC,TGT of a Multi30k split (en, de), cut to the first `rows` pairs when given."""
    m = DATA / "multi30k"
    if not rows:
        return f"{m / f'{split}.en.gz'},{m / f'{split}.de.gz'}"
    out = []
    for lang in ("en", "de"):
        lines = gzip.open(m / f"{split}.{lang}.gz", "rt", encoding="utf-8").read().split("\n")[:rows]
        (work / f"{split}{rows}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(str(work / f"{split}{rows}.{lang}"))
    return ",".join(out)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _recipe(config: str, **bench):
    """lmtune's recipe: the FinetuneConfig that `lmtune finetune --config configs/<config>` builds, with the
    bench's own settings over it (its data, output and budget, and where it validates or saves otherwise), so
    that the bench runs the very hyperparameters a user runs."""
    from lmtune.config import FinetuneConfig
    from lmtune.config.options import build, read_yaml

    path = str(CONFIGS / config)
    return build(FinetuneConfig, read_yaml(path), path, bench)


SCRATCH_CONFIG = "translate/multi30k_en_de_scratch10m.yaml"  # lmtune's translation recipe


def multi30k_budget(a, work: Path, budget: str) -> list[Row]:
    """English -> German at one wall-clock budget: lmtune's recipe (scratch:10m) against the Hugging Face
    Trainer with its defaults on the same model (the same tokenizer, layout, weights at the start and
    encoded pairs), both stopped by the clock, both scored by lmtune's evaluate on test2016."""
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune
    from lmtune.train.budget import parse_duration

    train, val = _multi30k_files(work, "train"), _multi30k_files(work, "val", 300)
    test = _multi30k_files(work, "test_2016_flickr")
    rows, what = [], f"Multi30k en-de test2016 BLEU, {budget}"
    if "recipe" in a.contenders:
        out, t0 = work / f"m30k-lmtune-{budget}", time.perf_counter()
        finetune(_recipe(SCRATCH_CONFIG, data=train, eval_data=val, out=str(out), budget=budget, threads=a.threads))
        spent = time.perf_counter() - t0
        r = _evaluate(str(out / "best"), "translate", test, limit=a.gen_rows, max_new_tokens=48, batch_size=32)
        rows.append(Row(what, "scratch:10m lmtune recipe", r["bleu"], "from scratch (GPU): about 30-35", spent, "recipe"))
    if "trainer" in a.contenders:
        peer_dir, spent = _hf_trainer_translate(work, train, parse_duration(budget), a)
        r = _evaluate(str(peer_dir), "translate", test, limit=a.gen_rows, max_new_tokens=48, batch_size=32)
        rows.append(Row(what, "scratch:10m HF Trainer", r["bleu"], "(peer, same budget)", spent, "peer"))
    if "pretrained" in a.contenders:  # the other way lmtune could go: a pretrained English model, LoRA
        out, t0 = work / f"m30k-smollm2-{budget}", time.perf_counter()
        finetune(FinetuneConfig(task="translate", model="smollm2-135m", lora=True, data=train, out=str(out),
                                budget=budget, batch_size=8, learning_rate=1e-3, max_length=160, max_new_tokens=48,
                                threads=a.threads, retain_data="none"))
        spent = time.perf_counter() - t0
        r = _evaluate(str(out), "translate", test, limit=a.gen_rows, max_new_tokens=48, batch_size=16)
        rows.append(Row(what, "smollm2-135m LoRA lmtune", r["bleu"], "(the pretrained route)", spent, "other"))
    return rows


def _clock(t0: float, seconds: float):
    """A Trainer callback that stops training once `seconds` have passed since `t0`, less a few to save."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - t0 > seconds - 10:
                control.should_training_stop = True
    return Clock()


def _hf_trainer(model, examples, to_batch, t0: float, seconds: float, work: Path, name: str) -> None:
    """The Hugging Face Trainer with its defaults (batch 8, lr 5e-5, linear decay over 3 epochs, fp32, no
    warmup) on lmtune's model and encoded examples, stopped when `seconds` have passed since `t0` (less a few
    seconds to save), or at the end of its 3 epochs, whichever comes first."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(work / f"{name}-tmp"), save_strategy="no", report_to=[],
                             use_cpu=True, logging_steps=100, disable_tqdm=True,
                             remove_unused_columns=False)  # all else: the defaults (this one: lmtune targets)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=to_batch,
            callbacks=[_clock(t0, seconds)]).train()


def _hf_trainer_translate(work: Path, train: str, seconds: float, a) -> tuple[Path, float]:
    """The Trainer's defaults on lmtune's scratch:10m model and encoded pairs (the clock counts from building
    the tokenizer and model)."""
    from lmtune import models
    from lmtune.data.batching import collate
    from lmtune.tasks import translate

    t0 = time.perf_counter()
    cfg = _recipe(SCRATCH_CONFIG, data=train, eval_data="", budget="", out=str(work / "unused"))
    rows = translate.read(train, cfg)
    model, tok, meta = translate.scratch(cfg.model, cfg, rows)
    examples = translate.encode(rows, tok, cfg, meta, train)

    def coll(batch):
        b = collate(batch, tok.pad_token_id)
        b.pop("n_tokens")
        return b

    _hf_trainer(model, examples, coll, t0, seconds, work, "m30k")
    out = work / "m30k-hf-trainer"
    out.mkdir(parents=True, exist_ok=True)
    models.save_model(model, tok, out, {**meta, "base_model": cfg.model, "lora": False})
    return out, time.perf_counter() - t0


def _hf_trainer_encoder(work: Path, task: str, train: str, seconds: float, name: str, **opts) -> tuple[Path, float]:
    """The Trainer's defaults on an encoder task (classify: run_glue's; qa: run_qa's), on the model lmtune's
    task loads (the same head) and the examples lmtune's task encodes, saved as lmtune saves, so that lmtune's
    evaluate scores it with the same code. The clock counts from reading the data."""
    from lmtune import models, tasks
    from lmtune.config import FinetuneConfig

    t0 = time.perf_counter()
    cfg = FinetuneConfig(task=task, data=train, out=str(work / "unused"), **opts)
    t = tasks.get(task)
    rows = t.read(train, cfg)
    model, tok, meta = t.load(cfg.model, cfg, rows)
    examples = t.encode(rows, tok, cfg, meta, train)
    coll = t.collate(tok, meta)

    def to_batch(batch):  # lmtune's targets ([-100, target...] a row) as the HF heads take them
        b = coll(batch)
        labels = b.pop("labels")
        b.pop("span", None)
        if task == "qa":
            b["start_positions"], b["end_positions"] = labels[:, 1], labels[:, 2]
        else:
            b["labels"] = labels[:, 1]
        return b

    _hf_trainer(model, examples, to_batch, t0, seconds, work, name)
    out = work / f"{name}-hf-trainer"
    out.mkdir(parents=True, exist_ok=True)
    models.save_model(model, tok, out, {**meta, "base_model": cfg.model, "lora": False})
    return out, time.perf_counter() - t0


# lmtune's sentiment recipes (MiniLM-L6: the best trial of its sweep; SmolLM2-135M-Instruct with LoRA, its
# classification head trained whole) and extractive QA recipe (the best trial of its sweep). The bench trains on
# all its training data, never validates and scores the final model: no dev file, held-back share or checkpoints.
SST2_CONFIGS = {"minilm-l6": "classify/sst2_minilm.yaml", "smollm2-135m": "classify/sst2_smollm2.yaml"}
XQUAD_CONFIG = "qa/xquad_minilm.yaml"
NO_VALIDATION = dict(eval_data="", val_split=0.0, eval_every=0, save_every=10**9)


def sst2_budget(a, work: Path, budget: str) -> list[Row]:
    """SST-2 at one budget: lmtune's recipe against the Trainer with run_glue's defaults (dynamic padding
    here, the stronger setting: run_glue pads to 128; a full fine-tune), on the same model (--sst2-model,
    MiniLM-L6 by default), scored on the GLUE dev sentences."""
    from lmtune.finetune import finetune
    from lmtune.train.budget import parse_duration

    train, dev = str(DATA / "sst2" / "train.tsv"), str(DATA / "sst2" / "dev.tsv")
    rows, what = [], f"SST-2 dev accuracy, {budget}"
    if "recipe" in a.contenders:
        out, t0 = work / f"sst2-lmtune-{budget}", time.perf_counter()
        finetune(_recipe(SST2_CONFIGS[a.sst2_model], data=train, out=str(out), budget=budget, threads=a.threads,
                         **NO_VALIDATION))
        spent = time.perf_counter() - t0
        r = _evaluate(str(out), "classify", dev, text_column="sentence", max_length=128)
        rows.append(Row(what, f"{a.sst2_model} lmtune recipe", r["accuracy"], "DistilBERT 91.3 (GPU)", spent, "recipe"))
    if "trainer" in a.contenders:
        peer, spent = _hf_trainer_encoder(work, "classify", train, parse_duration(budget), f"sst2-{budget}",
                                          model=a.sst2_model, text_column="sentence", max_length=128)
        r = _evaluate(str(peer), "classify", dev, text_column="sentence", max_length=128)
        rows.append(Row(what, f"{a.sst2_model} HF Trainer", r["accuracy"], "(peer, same budget)", spent, "peer"))
    return rows


def xquad_budget(a, work: Path, budget: str) -> list[Row]:
    """Extractive QA at one budget on XQuAD-en split by article (27 train, 9 dev): lmtune's recipe against the
    Trainer with run_qa's defaults (384-token windows, stride 128), MiniLM-L6 both, F1 on the dev articles."""
    from lmtune.finetune import finetune
    from lmtune.train.budget import parse_duration

    train, dev = _xquad_split(work)
    rows, what = [], f"XQuAD-en dev F1 (9 unseen articles), {budget}"
    if "recipe" in a.contenders:
        out, t0 = work / f"xquad-lmtune-{budget}", time.perf_counter()
        cfg = _recipe(XQUAD_CONFIG, data=train, out=str(out), budget=budget, threads=a.threads, **NO_VALIDATION)
        finetune(cfg)
        spent = time.perf_counter() - t0
        r = _evaluate(str(out), "qa", dev, max_length=cfg.max_length, doc_stride=cfg.doc_stride)
        rows.append(Row(what, "minilm-l6 lmtune recipe", r["f1"], "mBERT 83.5 (after SQuAD)", spent, "recipe"))
    if "trainer" in a.contenders:
        peer, spent = _hf_trainer_encoder(work, "qa", train, parse_duration(budget), f"xquad-{budget}",
                                          model="minilm-l6", max_length=384, doc_stride=128)
        r = _evaluate(str(peer), "qa", dev, max_length=384, doc_stride=128)
        rows.append(Row(what, "minilm-l6 HF Trainer", r["f1"], "(peer, same budget)", spent, "peer"))
    return rows


INSTRUCT_CONFIG = "smollm2/135m_lora.yaml"  # lmtune's instruction recipe, the best trial of its sweep


def _alpaca_split(work: Path, held_back: int = 50) -> tuple[str, str, int]:
    """The Alpaca records less the last `held_back` (the sweep's 1%), and those: never trained on; and how
    many records the first file holds."""
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())
    paths = []
    for name, part in (("train", rows[:-held_back]), ("dev", rows[-held_back:])):
        p = work / f"alpaca.{name}.json"
        p.write_text(json.dumps(part))
        paths.append(str(p))
    return paths[0], paths[1], len(rows) - held_back


def instruct_budget(a, work: Path, budget: str) -> list[Row]:
    """Instruction following at one budget: lmtune's recipe (SmolLM2-135M-Instruct, LoRA) against TRL's
    SFTTrainer with its defaults and the same LoRA (r 16, alpha 32, every linear layer), on the same records;
    both scored by lmtune's evaluate: the loss per response token on the 50 held-back records (lower is
    better)."""
    from lmtune.finetune import finetune
    from lmtune.train.budget import parse_duration

    train, dev, n_train = _alpaca_split(work)
    rows, what = [], f"Alpaca held-back response loss (lower wins), {budget}"
    if "recipe" in a.contenders:
        out, t0 = work / f"alpaca-lmtune-{budget}", time.perf_counter()
        # checkpoints every 100 steps (the default), where the config saves every 50
        finetune(_recipe(INSTRUCT_CONFIG, data=train, out=str(out), budget=budget, threads=a.threads, save_every=100))
        spent = time.perf_counter() - t0
        r = _evaluate(str(out), "instruct", dev, max_length=512)
        rows.append(Row(what, "smollm2-135m lmtune recipe", r["loss"], "(no published figure)", spent, "recipe"))
    if "trainer" in a.contenders:
        peer, spent = _trl_sft(work, n_train, parse_duration(budget))
        r = _evaluate(str(peer), "instruct", dev, max_length=512)
        rows.append(Row(what, "smollm2-135m TRL SFTTrainer", r["loss"], "(peer, same budget)", spent, "peer"))
    return rows


def _trl_sft(work: Path, n_records: int, seconds: float) -> tuple[Path, float]:
    """TRL's SFTTrainer with its defaults (batch 8, lr 2e-5, linear over 3 epochs, bf16 and gradient
    checkpointing on, the loss on the completions) and lmtune's LoRA shape, on the Alpaca records as
    prompt/completion conversations, stopped by the same clock as the Trainer above; saved merged, as lmtune
    saves a full model."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lmtune import models
    from lmtune.tasks import instruct

    from throughput import alpaca_records  # bench/throughput.py: Alpaca records as TRL's conversations

    t0 = time.perf_counter()
    records = alpaca_records(n_records)  # the first n_records: the records lmtune's recipe trains on
    model, tok = models.load_causal_lm("smollm2-135m")

    args = SFTConfig(output_dir=str(work / "sft-tmp"), save_strategy="no", report_to=[], use_cpu=True,
                     logging_steps=100, disable_tqdm=True)  # all else: TRL's defaults
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[_clock(t0, seconds)])
    trainer.train()
    out = work / "alpaca-trl-sft"
    out.mkdir(parents=True, exist_ok=True)
    merged = trainer.model.merge_and_unload().float()
    models.save_model(merged, tok, out, {"task": "instruct", "head": instruct.HEAD, "kind": "decoder",
                                         "base_model": "smollm2-135m", "lora": False})
    return out, time.perf_counter() - t0


BUDGET_RUNS = {"multi30k": multi30k_budget, "sst2": sst2_budget,
               "xquad": xquad_budget, "instruct": instruct_budget}


RUNS = {"sst2": sst2, "multi30k": multi30k, "xquad-ext": xquad_extractive, "xquad-gen": xquad_generative,
        "wikitext2": wikitext2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="CPU budget of training per fine-tune, in minutes")
    p.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--gen-rows", type=int, default=100, help="rows scored where the model generates")
    p.add_argument("--lm-lines", type=int, default=0, help="WikiText-2 lines for perplexity (0: all 3,760)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--budget", default="", help="comma-separated wall-clock budgets (e.g. 10m,30m): each task "
                   "that has a peer here (multi30k) runs lmtune's recipe and the HF Trainer on the same budget")
    p.add_argument("--tasks", default="multi30k", help=f"with --budget: comma-separated subset of "
                   f"{','.join(BUDGET_RUNS)}")
    p.add_argument("--contenders", default="recipe,trainer,pretrained",
                   help="with --budget: recipe (lmtune), trainer (the peer: HF Trainer or TRL SFTTrainer, same model), "
                        "pretrained (lmtune, SmolLM2-135M LoRA)")
    p.add_argument("--sst2-model", default="minilm-l6", choices=("minilm-l6", "smollm2-135m"),
                   help="with --budget and sst2: the model both contenders fine-tune")
    a = p.parse_args()
    if a.budget:
        return by_budget(a)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    table = []
    with tempfile.TemporaryDirectory(prefix="lmtune-quality-") as tmp:
        for name in a.only.split(","):
            t0 = time.perf_counter()
            for row in RUNS[name](a, Path(tmp)):
                table.append((*row, time.perf_counter() - t0))
                print(f"[{name}] {row[0]}: {row[2]} (published: {row[3]})", file=sys.stderr, flush=True)
    print(f"\nlmtune quality, training budget {a.minutes} min per fine-tune, {a.gen_rows} generated rows max\n")
    print(f"{'benchmark':<44} {'model':<24} {'lmtune':>11}  {'wall':>7}  published")
    for bench, model, value, published, wall in table:
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{bench:<44} {model:<24} {shown:>11}  {wall / 60:>5.1f}m  {published}")


def by_budget(a) -> None:
    table = []
    with tempfile.TemporaryDirectory(prefix="lmtune-quality-") as tmp:
        for budget in a.budget.split(","):
            for task in a.tasks.split(","):
                for row in BUDGET_RUNS[task](a, Path(tmp), budget):
                    table.append(row)
                    print(f"[{budget}] {row.bench} {row.who}: {row.value:.2f} in {row.wall / 60:.1f} min", file=sys.stderr,
                          flush=True)
    print(f"\nquality at equal wall-clock budgets, {a.gen_rows or 'all'} generated rows\n")
    print(f"{'benchmark':<48} {'contender':<28} {'value':>6}  {'wall':>6}  published")
    for row in table:
        print(f"{row.bench:<48} {row.who:<28} {row.value:>6.2f}  {row.wall / 60:>5.1f}m  {row.published}")
    for bench in dict.fromkeys(row.bench for row in table):  # lmtune's recipe against the peer, each budget
        ours = [row for row in table if row.bench == bench and row.role == "recipe"]
        peer = [row for row in table if row.bench == bench and row.role == "peer"]
        if ours and peer:
            name, value = peer[0].who.split(" ", 1)[1], peer[0].value
            print(f"{bench}: lmtune - {name} = {ours[0].value - value:+.2f} ({ours[0].value / max(value, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
