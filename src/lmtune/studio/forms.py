"""The New run and Evaluate forms: generated from the config dataclasses that generate `--help`, checked
by the command line's own parser, so a new config field appears in the form without UI code and a bad
value gets the message the CLI prints.

A form's values become an argv list (`--key=value`, `--flag`/`--no-flag`), parsed by `cli.parse`, and the
same argv launches the child (`python -m lmtune VERB ARGV`): what was checked is what runs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from lmtune import cli
from lmtune.config import options
from lmtune.errors import LmtuneError

FORM_VERBS = ("finetune", "pretrain", "evaluate")
PATH_FIELDS = ("data", "eval_data", "model", "tokenizer", "model_config", "out")


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _text(value) -> str:
    return "" if value is None else str(value)


def schema(verb: str) -> dict:
    """The verb's fields in groups: first those its own config class declares, then each shared class's."""
    if verb not in FORM_VERBS:
        raise LmtuneError(f"no form for '{verb}': forms exist for {', '.join(FORM_VERBS)}")
    cls, _, summary = cli.VERBS[verb]
    hints = typing.get_type_hints(cls)
    groups: dict[type, list] = {}
    for name, f in options.fields_of(cls).items():
        typ, meta = hints[name], f.metadata
        # the verb's own fields and the required ones come first, open; each shared class's in its own group
        owner = cls if meta.get("required") else \
            next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        if typ not in (bool, int, float, str):
            continue  # mappings and lists (sweep's) come from YAML only
        groups.setdefault(owner, []).append({
            "name": name, "flag": "--" + name.replace("_", "-"), "type": typ.__name__,
            "default": default_of(f) if typ is bool else _text(default_of(f)), "help": meta["help"],
            "choices": list(meta["choices"]) if meta.get("choices") else None, "min": meta.get("min"),
            "max": meta.get("max"), "required": bool(meta.get("required"))})
    own = list(vars(cls).get("__annotations__", {}))
    groups.get(cls, []).sort(key=lambda fd: (not fd["required"], own.index(fd["name"]) if fd["name"] in own else 0))
    order = sorted(groups, key=lambda k: k is not cls)
    return {"verb": verb, "summary": summary, "doc": (cls.__doc__ or "").strip(),
            "groups": [{"title": "Settings" if k is cls else re.split(r"[,;.]", k.__doc__ or k.__name__)[0].strip(),
                        "main": k is cls, "fields": groups[k]} for k in order]}


def form_argv(verb: str, values: dict) -> list[str]:
    """The argv that gives the form's values: only what differs from the default (so the reproducing
    command stays short); a name the config does not know is passed on, for the CLI's own error."""
    fields = options.fields_of(cli.VERBS[verb][0])
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        f = fields.get(name)
        if isinstance(value, bool):
            if f is None or value != default_of(f):
                argv.append(flag if value else "--no-" + flag[2:])
            continue
        text = _text(value).strip()
        if f is not None and (text == _text(default_of(f)) or (not text and f.metadata.get("required"))):
            continue
        argv.append(f"{flag}={text}")
    return argv


def parse(verb: str, values: dict):
    """(config, argv) as `lmtune VERB ARGV` would get them; LmtuneError with the CLI's message if not."""
    argv = form_argv(verb, values)
    return cli.parse(verb, argv), argv


def confine(cfg, workspace: Path, readable: list[Path]) -> None:
    """Refuse a path outside the workspace (outputs) or the readable folders (data, models)."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name, "")
        if not value or (name == "out" and value == "(estimate)"):
            continue
        allowed = [workspace] if name == "out" else [workspace, *readable]
        for part in str(value).split(",") if name in ("data", "eval_data") else [str(value)]:
            p = Path(part).expanduser()
            if not (p.is_absolute() or part.startswith(".") or p.exists() or name == "out"):
                continue  # an alias (smollm2-135m) or a hub id, not a file
            resolved = p.resolve()
            if not any(resolved == r or r in resolved.parents for r in allowed):
                where = ", ".join(str(r) for r in allowed)
                hint = "choose a folder inside the workspace" if name == "out" else \
                    "start lmtune studio with --data FOLDER to allow that folder"
                raise LmtuneError(f"--{name.replace('_', '-')} {part}: outside the folders this studio may use "
                                  f"({where}); {hint}")


_TOKENIZERS: dict[str, object] = {}


def preview(cfg, verb: str, n: int = 4) -> dict:
    """The first rows as the model will see them: tokens, and which of them carry the loss."""
    from lmtune.data.readers import read_records, read_text

    if verb != "finetune" or cfg.task not in ("instruct", "lm"):
        rows = read_records(cfg.data)[:n] if verb != "pretrain" else [{"text": read_text(cfg.data)[:2000]}]
        what = "pretrain trains its tokenizer at launch" if verb == "pretrain" else \
            f"--task {cfg.task}: the loss is on the label/target, not on these tokens"
        return {"rows": [{"fields": {k: v for k, v in r.items() if k != "_line"}} for r in rows], "note": what}
    from lmtune import models

    if cfg.model not in _TOKENIZERS:
        _TOKENIZERS.clear()  # one at a time: a tokenizer can be large
        _TOKENIZERS[cfg.model] = models.load_tokenizer(models.resolve(cfg.model))
    tok = _TOKENIZERS[cfg.model]
    out = []
    if cfg.task == "instruct":
        from lmtune.data.batching import IGNORE
        from lmtune.tasks import instruct

        for row in read_records(cfg.data)[:n]:
            ex, truncated = instruct.encode_row(row, tok, cfg.max_length, cfg.data)
            if ex is None:
                out.append({"tokens": [], "note": f"line {row.get('_line')}: no response left within "
                                                  f"max_length={cfg.max_length}: skipped"})
                continue
            out.append({"tokens": [[tok.decode([i]), label != IGNORE] for i, label in
                                   zip(ex["input_ids"], ex["labels"])], "truncated": truncated,
                        "line": row.get("_line")})
    else:  # lm: every token of a block is a target
        ids = tok(read_text(cfg.data)[:20000], add_special_tokens=False)["input_ids"][:cfg.max_length * n]
        for b in range(0, len(ids), cfg.max_length):
            out.append({"tokens": [[tok.decode([i]), True] for i in ids[b:b + cfg.max_length]]})
    n_loss = sum(t[1] for r in out for t in r.get("tokens", []))
    n_all = sum(len(r.get("tokens", [])) for r in out)
    return {"rows": out, "note": f"{n_loss} of {n_all} tokens carry the loss (highlighted)"}
