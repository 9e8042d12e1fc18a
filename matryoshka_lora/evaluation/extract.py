"""Answer extraction and exact match, identical to lm-evaluation-harness's ``gsm8k`` task.

Source of truth: ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (lm-eval 0.4.9 .. 0.4.13, task version 3.0):

    doc_to_text: "Question: {{question}}\\nAnswer:"      doc_to_target: "{{answer}}"
    generation_kwargs: until: ["Question:", "</s>", "<|im_end|>"], do_sample: false
    filter_list:
      strict-match:     regex "#### (\\-?[0-9\\.\\,]+)", then take_first
      flexible-extract: regex "(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select -1, then take_first
    metric exact_match: ignore_case true, ignore_punctuation false,
                        regexes_to_ignore [",", "\\$", "(?s).*#### ", "\\.$"]

with the regex filter of ``lm_eval/filters/extraction.py::RegexFilter`` (``findall``, pick match
``group_select``, first non-empty group of a tuple, ``strip()``, fallback ``"[invalid]"``), the stop
handling of ``lm_eval/models/utils.py::postprocess_generated_text`` (``split(term)[0]`` for each stop in
order) and ``lm_eval/api/metrics.py::exact_match_hf_evaluate`` (regexes first, then lower-casing).
The default few-shot layout (``lm_eval/config/task.py``): target delimiter " ", few-shot delimiter "\\n\\n";
a task without ``until`` stops at the few-shot delimiter.
"""
import re
import string

STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FALLBACK = "[invalid]"
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval's ``RegexFilter`` on one response: match ``group_select`` of ``findall``, stripped."""
    if not isinstance(text, str):
        text = ""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        groups = [m for m in match if m]
        match = groups[0] if groups else fallback
    return match.strip()


def strict_extract(text: str) -> str:
    """The ``strict-match`` filter: the number after the first ``#### ``."""
    return regex_extract(text, STRICT_REGEX, group_select=0)


def flexible_extract(text: str) -> str:
    """The ``flexible-extract`` filter: the last number-like span (``$``, ``,`` and ``.`` allowed inside)."""
    return regex_extract(text, FLEXIBLE_REGEX, group_select=-1)


def normalize(text: str, regexes_to_ignore=GSM8K_IGNORE, ignore_case: bool = True,
              ignore_punctuation: bool = False) -> str:
    """What ``exact_match`` compares: each regex removed in order, then lower-cased, then punctuation dropped."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, **normalize_kwargs) -> bool:
    """lm-eval's ``exact_match`` of one prediction (default: the gsm8k task's normalisation)."""
    return normalize(prediction, **normalize_kwargs) == normalize(reference, **normalize_kwargs)


def truncate_at_stop(text: str, stop) -> str:
    """Cut ``text`` at each stop string in turn (lm-eval's ``postprocess_generated_text``); '' is ignored."""
    for term in [stop] if isinstance(stop, str) else (stop or ()):
        if term:
            text = text.split(term)[0]
    return text


def gsm8k_scores(completion: str, answer: str) -> dict:
    """Both gsm8k filters on one generated completion against the full reference answer.

    Returns:
        ``{"strict": str, "flexible": str, "strict_match": bool, "flexible_match": bool}``; the
        reference goes through the same normalisation, whose ``(?s).*#### `` keeps only its final number.
    """
    strict = strict_extract(completion)
    flexible = flexible_extract(completion)
    return {"strict": strict, "flexible": flexible,
            "strict_match": exact_match(strict, answer), "flexible_match": exact_match(flexible, answer)}
