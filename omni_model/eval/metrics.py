"""Scores of generated text against the references, with maintained libraries: exact match (whitespace-normalised),
word / character error rate (jiwer) for transcription-like sources, BLEU and chrF (sacrebleu) for free text. ROUGE-L
is not used (no maintained ROUGE package is installed); BLEU/chrF serve free text.

`eval.metric` picks the headline metric per `source`: `auto` (transcription-like source names -> wer, answers of at
most three words -> exact_match, else chrf), one metric name for every source, or a mapping {source: metric} with an
optional `default` entry. Every metric is computed for every group anyway; the headline is what the report leads with.
"""

from __future__ import annotations

import re
from typing import Optional, Union

METRICS = ("exact_match", "wer", "cer", "bleu", "chrf")
LOWER_IS_BETTER = {"wer", "cer", "loss"}
TRANSCRIPTION_SOURCE = re.compile(r"asr|transcri|speech.?to.?text|stt|dictation|caption", re.IGNORECASE)
NO_SOURCE = "(none)"


def normalise(text: str) -> str:
    return " ".join(text.split())


def corpus_scores(references: list[str], answers: list[str]) -> dict:
    """All metrics over a group: exact match = fraction of equal answers; WER/CER over the whole group (jiwer's
    corpus form: errors / reference words); BLEU/chrF sacrebleu's corpus scores (0..100)."""
    import jiwer
    import sacrebleu

    if not references:
        return {name: None for name in METRICS}
    refs, hyps = [normalise(r) for r in references], [normalise(a) for a in answers]
    scored = [(r, h) for r, h in zip(refs, hyps) if r]  # jiwer refuses empty references
    return {
        "exact_match": sum(r == h for r, h in zip(refs, hyps)) / len(refs),
        "wer": jiwer.wer([r for r, _ in scored], [h for _, h in scored]) if scored else None,
        "cer": jiwer.cer([r for r, _ in scored], [h for _, h in scored]) if scored else None,
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
    }


def headline_metric(source: Optional[str], references: list[str], rule: Union[str, dict]) -> str:
    """The metric `eval.metric` names for this source (see the module doc)."""
    if isinstance(rule, dict):
        rule = rule.get(source or NO_SOURCE, rule.get("default", "auto"))
    if rule != "auto":
        if rule not in METRICS:
            raise ValueError(f"eval.metric {rule!r} is not one of auto, {', '.join(METRICS)}")
        return rule
    if source and TRANSCRIPTION_SOURCE.search(source):
        return "wer"
    if references and max(len(r.split()) for r in references) <= 3:
        return "exact_match"
    return "chrf"


def text_summary(rows: list[dict], rule: Union[str, dict]) -> dict:
    """Generated-answer scores: over all samples, and per source with its headline metric."""
    by_source: dict = {}
    for row in rows:
        by_source.setdefault(row.get("source") or NO_SOURCE, []).append(row)
    out = {"samples": len(rows), **corpus_scores([r["reference"] for r in rows], [r["answer"] for r in rows]),
           "by_source": {}}
    for source, group in sorted(by_source.items()):
        refs = [r["reference"] for r in group]
        scores = corpus_scores(refs, [r["answer"] for r in group])
        metric = headline_metric(None if source == NO_SOURCE else source, refs, rule)
        out["by_source"][source] = {"samples": len(group), "metric": metric, "value": scores[metric], **scores}
    return out
