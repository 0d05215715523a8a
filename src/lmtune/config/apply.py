"""The configs of the verbs that use a trained model or look at runs: generate, evaluate, predict, chat,
serve, merge, export, probe, report and studio."""

from __future__ import annotations

from dataclasses import dataclass

from lmtune.config.options import opt
from lmtune.config.train import TASKS, TaskOptions


@dataclass
class GenerateConfig:
    """`lmtune generate`: continue a prompt with a trained model."""

    model: str = opt("smollm2-135m", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.")
    prompt: str = opt("", "The prompt.", required=True)
    max_new_tokens: int = opt(64, "Most tokens to generate.", min=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.", min=0.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0: all).", min=0)
    top_p: float = opt(1.0, "Nucleus sampling probability mass.", min=0.0, max=1.0)
    template: str = opt("auto", "Prompt format: 'auto' (chat template if the tokenizer has one), 'chat' or 'raw'.",
                        choices=("auto", "chat", "raw"))
    seed: int = opt(0, "Seed for sampling.")
    bf16: bool = opt(None, "Generate in bf16 (half the bytes a token; greedy output may differ slightly from fp32; "
                     "default: on for a CUDA device that supports bf16, off on the CPU and MPS).")
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")
    compile: bool = opt(False, "torch.compile the one-token decode step (a compile of ~1-2 min on a CPU; "
                        "pays only for long generations).")
    quantize: str = opt("none", "Weight-only quantization of the matrices for decoding: int8 reads a quarter of "
                        "fp32's bytes a token (output may differ from fp32; Llama-family models).",
                        choices=("none", "int8"))


@dataclass
class EvaluateConfig(TaskOptions):
    """`lmtune evaluate`: score a model (base, full fine-tune, or base + LoRA adapter) on a task's data."""

    model: str = opt("", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.", required=True)
    task: str = opt("", "Task type.", choices=TASKS, required=True)
    data: str = opt("", "Evaluation data file (for translate also SRC_FILE,TGT_FILE).", required=True)
    json: bool = opt(False, "Print one JSON object on stdout instead of a table.")
    batch_size: int = opt(16, "Rows per batch.", min=1)
    max_length: int = opt(512, "Most tokens per input (lm: the perplexity window).", min=8)
    limit: int = opt(0, "Use only the first N rows (lm: lines) of the data; 0: all.", min=0)
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default.", min=0)
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")
    probe: str = opt("", "classify: also run a probe ('bias': counterfactual name/gender/nationality/religion swaps).",
                     choices=("", "bias"))
    reference: str = opt("", "instruct: also answer the prompts with this model and report the agreement (share of "
                         "greedy answers equal, normalised, to its answers), e.g. a fine-tune against its base.")


@dataclass
class PredictConfig(TaskOptions):
    """`lmtune predict`: batched inference, one JSONL output row per input row."""

    model: str = opt("", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.", required=True)
    task: str = opt("", "Task type.", choices=TASKS, required=True)
    data: str = opt("", "Input data file (targets/labels not needed).", required=True)
    out: str = opt("", "Output JSONL file (written to a temporary file, then renamed).", required=True)
    overwrite: bool = opt(False, "Replace an existing --out file.")
    batch_size: int = opt(16, "Rows per batch.", min=1)
    max_length: int = opt(512, "Most tokens per input (lm: the perplexity window).", min=8)
    limit: int = opt(0, "Use only the first N rows of the data; 0: all.", min=0)
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default.", min=0)
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")


@dataclass
class ChatConfig:
    """`lmtune chat`: talk to a model in the terminal (or through standard input).

    Commands: /reset (forget the conversation), /system TEXT (set the system message), /exit."""

    model: str = opt("smollm2-135m", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.")
    system: str = opt("", "System message to start with (empty: none, or the chat template's default).")
    max_new_tokens: int = opt(256, "Most tokens per reply.", min=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.", min=0.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0: all).", min=0)
    top_p: float = opt(1.0, "Nucleus sampling probability mass.", min=0.0, max=1.0)
    seed: int = opt(0, "Seed for sampling.")
    bf16: bool = opt(None, "Generate in bf16 (default: on for a CUDA device that supports bf16, off on the CPU "
                     "and MPS).")
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")


@dataclass
class ServeConfig:
    """`lmtune serve`: an OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions).

    Concurrent requests are generated together in batches. Binds 127.0.0.1 unless --host says otherwise."""

    model: str = opt("smollm2-135m", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.")
    model_name: str = opt("", "Name the API serves the model under; empty means the --model value.")
    host: str = opt("127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = opt(8000, "TCP port.", min=0, max=65535)
    api_key: str = opt("", "Require 'Authorization: Bearer KEY' on all requests (empty: env LMTUNE_API_KEY).")
    max_tokens: int = opt(512, "Largest max_tokens a request may ask for (and the default when it gives none).", min=1)
    max_prompt_tokens: int = opt(2048, "Longest prompt, in tokens, a request may send.", min=1)
    max_body_bytes: int = opt(1_000_000, "Largest request body in bytes.", min=1024)
    max_n: int = opt(4, "Most completions (n, or prompts x n) one request may ask for.", min=1)
    max_batch: int = opt(16, "Most sequences generated together in one batch.", min=1)
    batch_wait_ms: float = opt(0.0, "How long an idle batcher waits for more requests before it starts (0: at "
                               "once; a request that arrives later joins the running batch at its next step).", min=0.0)
    bf16: bool = opt(None, "Generate in bf16 (default: on for a CUDA device that supports bf16, off on the CPU "
                     "and MPS).")
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default.", min=0)


@dataclass
class MergeConfig:
    """`lmtune merge`: fold a LoRA adapter into its base model's weights; writes a plain HF model folder."""

    adapter: str = opt("", "LoRA adapter folder (as written by `lmtune finetune --lora`).", required=True)
    out: str = opt("", "Output folder for the merged model.", required=True)
    model: str = opt("", "Base model (default: the base named in the adapter's lmtune.json).")
    overwrite: bool = opt(False, "Replace what --out holds.")


@dataclass
class ExportConfig:
    """`lmtune export`: write a model (full, or base + LoRA adapter, merged) as a GGUF file or an HF folder."""

    model: str = opt("", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.", required=True)
    out: str = opt("", "Output: FILE.gguf for --format gguf, a folder for --format safetensors.", required=True)
    format: str = opt("gguf", "Output format.", choices=("gguf", "safetensors"))
    dtype: str = opt("f16", "Weight precision in the GGUF file (norms stay f32).", choices=("f16", "f32"))
    quantize: str = opt("", "GGUF weight type, quantized by the gguf package: f16, q8_0 or q4_0 (also f32, bf16, "
                        "q4_1, q5_0, q5_1); norms stay f32, and under q4_0/q4_1 the token embedding (the tied "
                        "output layer) is q8_0. Empty: --dtype.")
    overwrite: bool = opt(False, "Replace an existing --out.")


@dataclass
class ProbeConfig:
    """`lmtune probe --model M`: counterfactual bias probe. The same sentences with names, genders,
    nationalities or religions swapped: how often the predicted label flips (classify models), or how
    much the likelihood of continuations changes (generative models)."""

    model: str = opt("", "Model: a classify fine-tune (folder) or a causal LM.", required=True)
    probe: str = opt("bias", "Probe to run.", choices=("bias",))
    templates: str = opt("", "YAML/JSON file of your own templates (see lmtune/probes/bias.py); default: built-in.")
    json: bool = opt(False, "Print one JSON object instead of a table.")
    threshold: float = opt(0.1, "Flag an attribute whose flip rate or mean probability change exceeds this.",
                           min=0.0, max=1.0)
    device: str = opt("auto", "Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, "
                      "cuda:N or mps.")


@dataclass
class ReportConfig:
    """`lmtune report RUN_DIR [RUN_DIR ...]`: report.html with loss, learning rate, speed and validation
    plots and the run facts; several runs are overlaid for comparison."""

    POSITIONAL = "runs"  # cli: bare words are run folders

    runs: str = opt("", "Run folders (comma-separated, or given as bare words).", required=True)
    out: str = opt("", "Where to write report.html and its PNGs (default: the run folder, or ./report for several).")


@dataclass
class StudioConfig:
    """`lmtune studio`: a local web app over a workspace folder of runs (the runs, live curves, stop and
    resume, a new run from a form generated from these configs, compare, chat, evaluate, sweeps).
    Binds 127.0.0.1 unless --host says otherwise; any other address needs --token. The pages read and
    write only inside --runs and the --data folders."""

    runs: str = opt("runs", "Workspace folder: every run folder under it is listed; new runs are written into it.")
    data: str = opt("", "Comma-separated folders the pages may read data files and models from (besides --runs).")
    host: str = opt("127.0.0.1", "Address to bind; a non-loopback address requires --token.")
    port: int = opt(7860, "TCP port.", min=0, max=65535)
    token: str = opt("", "Require this token: open http://HOST:PORT/?token=T once (it is kept in a cookie), or "
                     "send 'Authorization: Bearer T'.")
