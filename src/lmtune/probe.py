"""`lmtune probe --model M`: the counterfactual bias probe (lmtune.probes.bias) of a classifier or a causal LM."""

from __future__ import annotations

import json
import sys

from lmtune.config import ProbeConfig


def probe(cfg: ProbeConfig) -> dict:
    """Load the model (a classify fine-tune, or any causal LM), run the bias probe, print its report."""
    from lmtune import device, models
    from lmtune.probes import bias

    dev = device.settle(cfg)
    templates = bias.load_templates(cfg.templates)
    meta = models.read_lmtune_file(models.resolve(cfg.model))
    if meta.get("head") == "seq_cls":
        from lmtune.tasks import classify

        model, tokenizer, meta = classify.load(cfg.model, cfg)
        model = model.to(dev)
        report = bias.probe_bias(model, tokenizer, bias.classifier_proba(meta), templates,
                                 labels=meta["labels"], threshold=cfg.threshold)
    else:
        model, tokenizer = models.load_causal_lm(cfg.model, device=dev)
        report = bias.probe_generative(model, tokenizer, templates, threshold=cfg.threshold)
    print(json.dumps(report) if cfg.json else bias.format_report(report))
    sys.stdout.flush()
    return report
