"""The command line: one verb, one function. Arguments are parsed into the verb's typed config.

`lmtune VERB --help` is generated from the config dataclass, so the field docs are the help text.
Heavy modules (torch, transformers) are imported only once a verb runs, which keeps `--help` fast.
This is the only place that prints an `LmtuneError` and turns it into exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import logging
import os
import signal
import sys
import threading
import typing

from lmtune import config as C
from lmtune.config import options
from lmtune.errors import LmtuneError, require
from lmtune.train import budget

# verb -> (config class, "module:function", one-line summary)
VERBS = {
    "pretrain": (C.PretrainConfig, "lmtune.pretrain:pretrain", "Train a tokenizer and a causal LM from scratch on text."),
    "prepare": (C.PrepareConfig, "lmtune.prepare:prepare", "Tokenize a corpus once into token shards for pretrain."),
    "finetune": (C.FinetuneConfig, "lmtune.finetune:finetune", "Fine-tune a pretrained model on a task (full or LoRA)."),
    "evaluate": (C.EvaluateConfig, "lmtune.evaluate:evaluate", "Score a model on a task's data (metrics table or --json)."),
    "predict": (C.PredictConfig, "lmtune.predict:predict", "Run a model over a data file; write one JSONL row per input."),
    "generate": (C.GenerateConfig, "lmtune.generate:generate", "Generate text from a prompt."),
    "demo": (C.DemoConfig, "lmtune.demo:demo", "Fine-tune SmolLM2-135M on a built-in task, score before and after."),
    "chat": (C.ChatConfig, "lmtune.chat:chat", "Chat with a model in the terminal (streams the reply)."),
    "serve": (C.ServeConfig, "lmtune.serve:serve", "Serve a model over an OpenAI-compatible HTTP API."),
    "merge": (C.MergeConfig, "lmtune.merge:merge", "Merge a LoRA adapter into its base model's weights."),
    "export": (C.ExportConfig, "lmtune.export:export", "Export a model as a GGUF file or a plain HF folder."),
    "sweep": (C.SweepConfig, "lmtune.sweep:sweep", "Search hyperparameters with Optuna (resumable, shareable study)."),
    "estimate": (C.EstimateConfig, "lmtune.estimate:estimate", "Predict peak memory and time of a finetune/pretrain run."),
    "report": (C.ReportConfig, "lmtune.report:report", "Write report.html with plots of one run, or overlay several."),
    "probe": (C.ProbeConfig, "lmtune.probe:probe", "Counterfactual bias probe of a classifier or a causal LM."),
    "studio": (C.StudioConfig, "lmtune.studio:studio", "A local web app over a folder of runs: watch, launch, compare, chat."),
}

# verb -> the optional packages it cannot run without, and the extra that brings them (pyproject.toml)
EXTRAS = {
    "serve": (("fastapi", "serve"), ("uvicorn", "serve")),
    "sweep": (("optuna", "sweep"),),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise LmtuneError(f"{self.prog}: {message}")


def _verb_parser(verb: str) -> tuple[argparse.ArgumentParser, type]:
    cls, _, summary = VERBS[verb]
    doc = (cls.__doc__ or "").strip()
    p = _Parser(prog=f"lmtune {verb}", description=f"{summary}\n\n{doc}",
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                epilog="Any key can also be given as key=value. Command-line values win over --config.")
    p.add_argument("--config", help="YAML file with any of the keys below.")
    hints = typing.get_type_hints(cls)
    for name, f in options.fields_of(cls).items():
        typ, meta = hints[name], f.metadata
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = "" if meta.get("required") or value is None else f" (default: {value!r})"  # None: see help
        choices = f" One of: {', '.join(meta['choices'])}." if meta.get("choices") else ""
        help_text = f"{meta['help']}{choices}{default}"
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            # values stay strings here; config.options.coerce converts and checks them with one error style
            p.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=typ.__name__.upper(),
                           help=help_text)
    return p, cls


def parse(verb: str, argv: list[str]):
    """Parse a verb's arguments into its config object (defaults < --config file < command line)."""
    parser, cls = _verb_parser(verb)
    ns, rest = parser.parse_known_args(_join_negative_numbers(parser, argv))
    if hasattr(cls, "WRAPS"):
        return _parse_wrapper(cls, ns, rest)
    cli_values = {k: v for k, v in vars(ns).items() if k != "config"}
    known = list(options.fields_of(cls))
    positional = getattr(cls, "POSITIONAL", None)  # e.g. `lmtune report RUN_A RUN_B`
    bare = [item for item in rest if positional and not item.startswith("-") and "=" not in item]
    if bare:
        cli_values[positional] = ",".join(bare)
    for item in rest:
        if item in bare:
            continue
        if "=" in item and not item.startswith("-"):
            key, value = item.split("=", 1)
            cli_values[key.replace("-", "_")] = value
            continue
        name = item.lstrip("-").split("=")[0].replace("-", "_")
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f", did you mean '--{close[0].replace('_', '-')}'?" if close else f"; see 'lmtune {verb} --help'"
        raise LmtuneError(f"unknown option '{item}'{hint}")
    file_values = options.read_yaml(ns.config) if getattr(ns, "config", None) else {}
    return options.build(cls, file_values, ns.config or "", cli_values)


def _join_negative_numbers(parser, argv: list[str]) -> list[str]:
    """`--learning-rate -1e-4` as `--learning-rate=-1e-4`: argparse takes a word starting with '-' for an
    option (and reports a missing value), so a negative number after an option that takes a value is
    joined to it; the value is then checked like any other."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs is None for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_wrapper(cls, ns, rest: list[str]):
    """`lmtune estimate finetune --model ...`: its own options, then the wrapped verb's config (which
    also gets --config), parsed exactly as that verb parses it."""
    own = {k: v for k, v in vars(ns).items() if k != "config"}
    if rest and rest[0] in cls.WRAPS:
        own["verb"], rest = rest[0], rest[1:]
    cfg = options.build(cls, {}, "", own)
    given = (["--config", ns.config] if getattr(ns, "config", None) else []) + rest
    # an estimate writes nothing, so --out may be left out
    cfg.run = parse(cfg.verb, given + ["out=(estimate)"] if "--out" not in rest and not ns.config else given)
    return cfg


def _usage() -> str:
    lines = ["usage: lmtune VERB [options]   (lmtune VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {v:<10} {s}" for v, (_, _, s) in VERBS.items()]
    return "\n".join(lines)


class Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself): unwinds like Ctrl-C, so every verb's
    clean-up (temporary files) runs, then exit code 143."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] == "--version":
        from lmtune import __version__
        print(__version__)
        return
    verb = argv[0]
    budget.mark_start()  # a --budget counts from here, before the heavy imports
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        if verb not in VERBS:
            close = difflib.get_close_matches(verb, list(VERBS), n=1)
            hint = f", did you mean '{close[0]}'?" if close else f"; verbs: {', '.join(VERBS)}"
            raise LmtuneError(f"unknown verb '{verb}'{hint}")
        cfg = parse(verb, argv[1:])
        for package, extra in EXTRAS.get(verb, ()):
            require(package, extra, f"lmtune {verb}")
        module, func = VERBS[verb][1].split(":")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # peft imports bitsandbytes when it is installed; on an AVX512-bf16 CPU its import logs a warning about
        # an optional hub kernel package on stderr, for every LoRA verb. Its errors still reach the user.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        _resume_after_elastic_restart(cfg)
        getattr(importlib.import_module(module), func)(cfg)
    except LmtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
    except BaseException as e:  # the last net for a file-system fault that no verb named (a full disk...)
        from lmtune.files import write_error

        err = write_error(getattr(e, "filename", None) or "a file", e) \
            if isinstance(e, Exception) or type(e).__name__ == "CheckpointException" else None
        if err is None and _out_of_memory(e):
            err = LmtuneError(f"out of memory ({(str(e).splitlines() or ['MemoryError'])[0][:120]}): lower "
                              "--batch-size or --max-length (or use --lora, --activation-checkpointing)")
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        budget.run_start()  # a mark the verb did not take must not reach a later run in this process
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        dist = sys.modules.get("torch.distributed")  # not imported here: a signal may have cut an import short
        if dist is not None and getattr(dist, "is_available", lambda: False)() and \
                getattr(dist, "is_initialized", lambda: False)():
            dist.destroy_process_group()


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def _resume_after_elastic_restart(cfg) -> None:
    """A worker that torchrun restarted (--max-restarts) continues from the last checkpoint by itself."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and hasattr(cfg, "resume"):
        from pathlib import Path

        if any(Path(cfg.out, "checkpoints").glob("step-*/meta.pt")):
            cfg.resume = True
