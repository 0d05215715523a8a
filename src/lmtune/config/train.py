"""The configs of the verbs that train: pretrain, prepare, finetune, demo, and sweep and estimate, which
wrap finetune/pretrain. Training verbs share TrainConfig's fields (data only: no behaviour is inherited);
finetune, evaluate and predict share TaskOptions."""

from __future__ import annotations

from dataclasses import dataclass

from lmtune.config.options import opt
from lmtune.tasks import NAMES


@dataclass
class TrainConfig:
    """Settings of the training loop, shared by `pretrain` and `finetune`."""

    data: str = opt("", "Training data file (see README for formats).", required=True)
    out: str = opt("", "Output folder: model, checkpoints/, metrics.jsonl, run.json.", required=True)
    resume: bool = opt(False, "Continue from the latest checkpoint in --out.")
    overwrite: bool = opt(False, "Delete whatever --out holds and start afresh.")
    max_length: int = opt(512, "Context length in tokens; longer records are truncated (counted once).", min=8)
    batch_size: int = opt(8, "Sequences per micro-batch.", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (loss normalised by target tokens).", min=1)
    max_steps: int = opt(0, "Optimizer steps to take; 0 means use --epochs.", min=0)
    epochs: float = opt(1.0, "Passes over the training data when --max-steps is 0.", min=0.0)
    budget: str = opt("", "Wall-clock budget for the whole run (e.g. 90s, 30m, 2h, 1h30m), loading, validation and "
                          "saving included: the number of steps is set from the measured step time and re-planned as "
                          "the run goes, the schedule decays to that end, and --resume keeps it. Not with "
                          "--max-steps or --epochs.")
    optimizer: str = opt("adamw", "Optimizer.", choices=("sgd", "adam", "adamw", "rmsprop"))
    learning_rate: float = opt(3e-4, "Peak learning rate.", min=0.0)
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", min=0.0)
    momentum: float = opt(0.9, "Momentum for sgd and rmsprop.", min=0.0, max=1.0)
    schedule: str = opt("cosine", "Learning-rate schedule after warmup (wsd: warmup-stable-decay, constant then "
                                  "linear decay over the last 20%% of the steps).",
                        choices=("constant", "linear", "cosine", "wsd"))
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to --learning-rate.", min=0)
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value; 0 turns clipping off.", min=0.0)
    seed: int = opt(0, "Seed for initialisation, data order and dropout.")
    bf16: bool = opt(None, "Run forward and backward under bf16 autocast (default: on for a CUDA device that "
                     "supports bf16, off on the CPU and MPS).")
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")
    distributed: str = opt("none", "Engine across processes started by torchrun: ddp or fsdp (FSDP2).",
                           choices=("none", "ddp", "fsdp"))
    pack: bool = opt(False, "Pack several examples into each --max-length block (no compute on padding).")
    activation_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    checkpoint_share: float = opt(1.0, "With --activation-checkpointing: the share of decoder layers checkpointed, "
                                       "spread evenly (floor(share x layers): 0.4 is 12 of 30); the others keep "
                                       "their activations.", min=0.0, max=1.0)
    recompute_elementwise: bool = opt(True, "Keep matmul outputs but rebuild norm and MLP activations in backward "
                                            "(bit-identical; ~40%% less activation memory for Llama blocks; in the "
                                            "blocks --activation-checkpointing leaves alone; off under --compile).")
    mmap_threshold_mb: float = opt(8.0, "CPU memory (glibc): blocks of at least this many MB get their own memory map, "
                                        "returned to the system when freed, so freed activations leave no heap holes "
                                        "(about 10-15%% lower peak RSS for 1-3%% speed); 0 keeps glibc's default.",
                                   min=0.0, max=32.0)
    compile: bool = opt(False, "torch.compile each layer of the model (regional: one compile serves every layer "
                                "and batch length; the first step compiles, about half a minute on a CPU). A run "
                                "of 50+ steps times compiled against eager once per machine and shape and keeps "
                                "the faster.")
    group_by_length: bool = opt(True, "Without --pack: batch rows of similar length together (less padding).")
    max_nonfinite_steps: int = opt(5, "Stop after this many updates in a row with a NaN/inf loss (each is skipped).",
                                   min=1)
    val_split: float = opt(0.0, "Fraction of the training data held back for validation.", min=0.0, max=0.5)
    eval_every: int = opt(0, "Validate every N steps (0: only at the end, when there is validation data).", min=0)
    save_every: int = opt(100, "Write a checkpoint every N steps (and always at the end).", min=1)
    keep_checkpoints: int = opt(2, "How many of the latest checkpoints to keep.", min=1)
    log_every: int = opt(1, "Write a metrics.jsonl line every N steps.", min=1)
    report_to: str = opt("", "Also log metrics to 'wandb' or 'mlflow' (if installed; comma-separated for both).")
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default.", min=0)


TASKS = NAMES  # lmtune.tasks.NAMES: the one list of tasks


@dataclass
class TaskOptions:
    """How a task reads its data and makes predictions; shared by `finetune`, `evaluate` and `predict`."""

    text_column: str = opt("text", "classify: column (field) holding the text.")
    label_column: str = opt("label", "classify: column holding the label.")
    source_column: str = opt("source", "translate: field holding the source sentence (JSONL/CSV data). "
                             "Two line-aligned text files instead: --data SRC_FILE,TGT_FILE (plain or .gz).")
    target_column: str = opt("target", "translate: field holding the reference translation.")
    source_lang: str = opt("", "translate, decoder models: source language name in the prompt "
                           "(default: from a file name such as train.en.gz, else from the model's lmtune.json).")
    target_lang: str = opt("", "translate, decoder models: target language name in the prompt.")
    question_column: str = opt("question", "qa: field holding the question (JSONL/CSV; SQuAD JSON is read as is).")
    context_column: str = opt("context", "qa: field holding the context passage.")
    doc_stride: int = opt(128, "qa, encoder models: tokens shared by consecutive windows of a long context.", min=0)
    stride: int = opt(0, "lm: tokens the perplexity window moves each step (0: half of --max-length).", min=0)
    max_new_tokens: int = opt(64, "translate/qa with generating models: most tokens to generate.", min=1)
    messages_column: str = opt("", "instruct: field holding a chat (default: 'messages', or ShareGPT's "
                               "'conversations' of {from, value}).")
    role_map: str = opt("human=user,gpt=assistant", "instruct, ShareGPT data: speaker names -> roles, added to "
                        "the defaults human=user, gpt=assistant, system=system (e.g. bot=assistant).")
    chat_template: str = opt("", "instruct: Jinja chat template file, for a base model whose tokenizer has none.")
    beta: float = opt(0.1, "dpo: strength of the pull towards the reference model (higher: stay closer); "
                      "for --dpo-loss ipo the regularisation tau.", min=0.0)
    dpo_loss: str = opt("sigmoid", "dpo: the pair loss (sigmoid: DPO's; ipo: squared, on per-token log-ratios).",
                        choices=("sigmoid", "ipo"))
    label_smoothing: float = opt(0.0, "dpo, sigmoid loss: assumed share of pairs whose preference is flipped "
                                 "(conservative DPO).", min=0.0, max=0.5)
    orpo_lambda: float = opt(0.1, "orpo: weight of the odds-ratio term next to the chosen reply's NLL.", min=0.0)


@dataclass
class FinetuneConfig(TaskOptions, TrainConfig):
    """`lmtune finetune`: fine-tune a pretrained model on a task (instruct, classify, translate, qa, lm)."""

    model: str = opt("smollm2-135m", "Model: alias, local folder, .gguf file or hub id.")
    task: str = opt("instruct", "Task type.", choices=TASKS)
    eval_data: str = opt("", "Validation data file (same format as --data).")
    metric: str = opt("", "Validation metric that picks DIR/best and drives early stopping "
                      "(default: accuracy, bleu, f1, val_loss for classify, translate, qa, instruct/lm).")
    metric_mode: str = opt("auto", "Whether higher or lower --metric is better (auto: lower for loss/perplexity).",
                           choices=("auto", "max", "min"))
    early_stopping_patience: int = opt(0, "Stop after K validations without improvement of --metric (0: never).",
                                       min=0)
    learning_rate: float = opt(2e-4, "Peak learning rate.", min=0.0)
    max_length: int = opt(512, "Context length in tokens; longer records are truncated (counted once).", min=8)
    lora: bool = opt(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling = alpha / r).", min=0.0)
    lora_dropout: float = opt(0.05, "LoRA dropout.", min=0.0, max=1.0)
    lora_targets: str = opt("all-linear", "Modules to adapt: 'all-linear' or comma-separated names (q_proj,v_proj).")
    retain_data: str = opt("auto", "General data scored on the base model before training and at every validation, "
                           "to measure forgetting (retain_loss, retain_agreement in metrics.jsonl): instruct data "
                           "(agreement: share of greedy answers equal to the base model's) or raw text (.txt: loss "
                           "only). 'auto': lmtune's 50 built-in general prompts for --task instruct; 'none': off.")
    mix_retain: float = opt(0.0, "Replay: this share of the training examples (each epoch) are general prompts answered "
                            "by the base model itself (--replay-data), so the fine-tune keeps its general answers; "
                            "in [0, 1).", min=0.0)
    replay_data: str = opt("", "With --mix-retain: general prompts to replay (any instruct format; the responses are "
                           "the base model's own greedy answers, saved in OUT/replay.jsonl); empty: lmtune's 176 "
                           "built-in prompts (none of them in the built-in retain set).")
    replay_loss: str = opt("tokens", "With --mix-retain: what a replayed example teaches. 'tokens': the base model's "
                           "greedy answer (cross-entropy); 'kl': its whole next-token distribution at every position of the "
                           "replayed conversation (KL divergence from the model with the adapter switched off; keeps "
                           "more general answers; needs --lora).",
                           choices=("tokens", "kl"))
    quantize: str = opt("none", "With --lora: load the frozen base in 4 bits (QLoRA: bitsandbytes NF4, double "
                        "quantization, bf16 compute; causal-LM tasks; needs lmtune[gpu]). The adapter is saved as "
                        "usual; `lmtune merge` folds it into the de-quantized base.", choices=("none", "4bit"))


@dataclass
class PretrainConfig(TrainConfig):
    """`lmtune pretrain`: train a tokenizer and a GPT-style causal LM from scratch on raw text."""

    model_size: str = opt("1m", "Size preset of the model.", choices=("1m", "10m", "30m"))
    model_config: str = opt("", "JSON file with an explicit transformers LlamaConfig (overrides --model-size).")
    tokenizer: str = opt("bpe", "'bpe' (train byte-level BPE), 'char', or a path to an existing tokenizer.")
    vocab_size: int = opt(4096, "Vocabulary size when training a BPE tokenizer.", min=260)
    max_length: int = opt(256, "Block length in tokens.", min=8)
    learning_rate: float = opt(1e-3, "Peak learning rate.", min=0.0)
    val_split: float = opt(0.1, "Share of the documents (a document ends at a blank line) held back for "
                           "validation, spread through the text.", min=0.0, max=0.5)
    warmup_steps: int = opt(20, "Steps of linear warmup from 0 to --learning-rate.", min=0)
    weight_decay: float = opt(0.1, "Weight decay (decoupled for adamw).", min=0.0)
    text_column: str = opt("text", "JSONL/Parquet/datasets data: the column holding the text.")
    tokenizer_sample_mb: float = opt(32.0, "MB of text (from the start of the corpus) a bpe/char tokenizer is "
                                     "trained on.", min=0.01)
    workers: int = opt(2, "Processes that tokenize raw text into the prepared-shard cache ($LMTUNE_CACHE/tokens).",
                       min=1)
    val_max_blocks: int = opt(0, "Validate on at most this many blocks, evenly spread (0: all).", min=0)


@dataclass
class PrepareConfig:
    """`lmtune prepare`: tokenize a corpus once into memory-mappable token shards that `pretrain --data DIR` reads.

    --data takes text files (plain or .gz), globs, folders, JSONL/JSON/CSV/Parquet files (--text-column),
    folders written by datasets.save_to_disk, and hf:ORG/NAME[:CONFIG][@SPLIT] (online); comma-separated
    for several. A killed prepare, run again with the same command, continues where it stopped."""

    data: str = opt("", "Text: files, globs, folders, JSONL/Parquet, a save_to_disk folder or hf:ORG/NAME.",
                    required=True)
    out: str = opt("", "Output folder: manifest.json, tokenizer/, train-*.bin and val-*.bin shards.", required=True)
    tokenizer: str = opt("bpe", "'bpe' or 'char' (trained on a sample), a tokenizer folder, or a model alias.")
    vocab_size: int = opt(4096, "Vocabulary size when training a BPE tokenizer.", min=260)
    tokenizer_sample_mb: float = opt(32.0, "MB of text (from the start of the corpus) a bpe/char tokenizer is "
                                     "trained on.", min=0.01)
    text_column: str = opt("text", "JSONL/Parquet/datasets data: the column holding the text.")
    val_split: float = opt(0.1, "Share of documents held out for validation (chosen by document index).",
                           min=0.0, max=0.5)
    workers: int = opt(2, "Tokenizing worker processes (1: in this process).", min=1)
    shard_mb: float = opt(16.0, "MB of text per shard (one worker's unit of work).", min=0.001)


@dataclass
class DemoConfig:
    """`lmtune demo`: measure SmolLM2-135M on a built-in date task, fine-tune it with LoRA, measure again."""

    model: str = opt("smollm2-135m", "Model to fine-tune.")
    out: str = opt("runs/demo", "Run folder (adapter, metrics.jsonl, loss curve).")
    train_examples: int = opt(512, "Generated training examples.", min=8)
    eval_examples: int = opt(60, "Held-back examples scored before and after.", min=4)
    max_steps: int = opt(160, "LoRA optimizer steps (the task is learnt in about 20; the rest lets the replay "
                         "pull the general answers back: README, Forgetting).", min=1)
    batch_size: int = opt(8, "Sequences per step.", min=1)
    learning_rate: float = opt(5e-4, "Peak learning rate (5e-4: the task still reaches 98%% and more of the "
                               "general answers stay the base model's than at 2e-3; README, Forgetting).", min=0.0)
    seed: int = opt(0, "Seed for data generation and training.")
    overwrite: bool = opt(True, "Replace an earlier demo run in --out.")
    mix_retain: float = opt(0.7, "Share of the training examples that replay general prompts answered by the base "
                            "model (keeps its general answers; 0: the task alone).", min=0.0)
    replay_loss: str = opt("kl", "What a replayed example teaches: the base model's whole next-token distribution "
                           "('kl') or its greedy answer alone ('tokens').", choices=("tokens", "kl"))
    lora_r: int = opt(16, "LoRA rank (alpha is twice the rank).", min=1)
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")


@dataclass
class SweepConfig:
    """`lmtune sweep --config SWEEP.yaml`: search hyperparameters of a fine-tune (or a pretraining) with Optuna.

    The YAML holds `train:` (the keys of `verb`, finetune or pretrain, with validation data), `space:`
    (key: {low, high, log} for numbers, or a list of choices), `metric`, `direction` and `trials`. Example:
      train: {model: smollm2-135m, data: train.jsonl, eval_data: val.jsonl, lora: true, max_steps: 200, eval_every: 50}
      space: {learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}, lora_r: [8, 16, 32]}
    Several processes given the same --storage share one study; rerunning the command resumes it."""

    verb: str = opt("finetune", "What each trial runs: finetune, or pretrain (a model from scratch on raw text).",
                    choices=("finetune", "pretrain"))
    train: dict = opt({}, "Settings every trial starts from (any key of --verb, `lmtune finetune` by default).")
    space: dict = opt({}, "Search space: key: {low, high, log, step} (float/int) or key: [choice, ...].")
    enqueue: list = opt([], "Settings to try first, e.g. [{learning_rate: 1.0e-3}] (a known-good start).")
    out: str = opt("", "Sweep folder: study.db, one run folder per trial, best.yaml, trials.csv, report.html.",
                   required=True)
    metric: str = opt("val_loss", "Validation metric to optimise (val_loss, or one the task reports).")
    direction: str = opt("auto", "minimize or maximize --metric (auto: minimize losses, maximize the rest).",
                         choices=("auto", "minimize", "maximize"))
    trials: int = opt(20, "Trials the study should hold in all (finished, pruned or failed), all processes together.",
                      min=1)
    pruner: str = opt("median", "Stop poor trials early from their validations.",
                      choices=("median", "halving", "none"))
    startup_trials: int = opt(3, "Trials run in full (and sampled at random) before pruning and TPE start.", min=0)
    storage: str = opt("", "Optuna storage URL (default: sqlite:///OUT/study.db); any database URL Optuna accepts.")
    study_name: str = opt("lmtune-sweep", "Study name inside --storage.")
    seed: int = opt(-1, "Sampler seed; -1: random, so that processes sharing a study explore different points.")


@dataclass
class EstimateConfig:
    """`lmtune estimate finetune|pretrain [that verb's options] [--check]`: predicted peak memory and time.

    Takes the same options as the verb it estimates, e.g. `lmtune estimate finetune --model smollm2-135m
    --data train.jsonl --out runs/x --lora --batch-size 8`. Nothing is trained unless --check is given."""

    WRAPS = ("finetune", "pretrain")  # cli: the verbs whose options follow

    verb: str = opt("finetune", "The verb to estimate (may also be given as the first word).", choices=WRAPS)
    check: bool = opt(False, "Also run a few real steps through the training loop and print predicted vs measured.")
    check_steps: int = opt(4, "Steps --check runs (the first is warm-up and not timed).", min=2)
    json: bool = opt(False, "Print one JSON object instead of a table.")
