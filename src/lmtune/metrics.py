"""The metrics people publish, computed the way they are published.

classification: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix (GLUE-style, percent).
translation: corpus BLEU and chrF from sacrebleu with its default tokenisation (13a), as in WMT papers.
question answering: exact match and F1 of the official SQuAD v1.1 evaluation script, answer text
normalised (lower case, no punctuation, no articles a/an/the, single spaces), best over gold answers.
All scores are percentages (0-100), as papers print them. Nothing heavy is imported here.
"""

from __future__ import annotations

import collections
import re
import string


def classification(predictions: list[str], references: list[str], labels: list[str]) -> dict:
    """Accuracy and macro-F1 in percent, per-class precision/recall/F1, and the confusion matrix
    (rows: true label, columns: predicted label, both in the order of `labels`)."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references):
        matrix[index[r]][index[p]] += 1
    per_class, f1s = {}, []
    for i, lab in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = 100.0 * tp / predicted if predicted else 0.0
        recall = 100.0 * tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    hits = sum(matrix[i][i] for i in range(len(labels)))
    return {"accuracy": 100.0 * hits / max(len(references), 1), "macro_f1": sum(f1s) / max(len(f1s), 1),
            "per_class": per_class, "confusion_matrix": {"labels": list(labels), "matrix": matrix}}


def translation(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (one reference per sentence), sacrebleu defaults."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
            "chrf": chrf.corpus_score(hypotheses, [references]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


# ---- SQuAD v1.1 (the official evaluate-v1.1.py, function for function) -------------------------

def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_exact(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad(predictions: list[str], answers: list[list[str]]) -> dict:
    """Exact match and F1 in percent; each question scores its best match over its gold answers."""
    em = sum(max(squad_exact(p, g) for g in golds) for p, golds in zip(predictions, answers))
    f1 = sum(max(squad_f1(p, g) for g in golds) for p, golds in zip(predictions, answers))
    n = max(len(answers), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
