"""Answer extraction and exact match: hand-checked values, and agreement with lm-eval's own filter and metric."""
import pytest

from matryoshka_lora.evaluation.extract import (FALLBACK, GSM8K_IGNORE, exact_match, flexible_extract, gsm8k_scores,
                                     normalize, strict_extract, truncate_at_stop)

# (completion, strict, flexible) checked by hand against the regexes of lm_eval/tasks/gsm8k/gsm8k.yaml
CASES = [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("The total is 1,234.", FALLBACK, "1,234."),
    ("#### 1,000", "1,000", "1,000"),
    ("He owes #### -7 dollars", "-7", "-7"),
    ("It drops to -5 degrees", FALLBACK, "-5"),
    ("It takes 3.5 hours", FALLBACK, "3.5"),
    ("It costs $1,250.50 in total", FALLBACK, "$1,250.50"),
    ("5 apples and 7 pears", FALLBACK, "7"),
    ("####7 without the space", FALLBACK, "7"),
    ("#### 12\n#### 13", "12", "13"),
    ("no number at all", FALLBACK, FALLBACK),
    ("", FALLBACK, FALLBACK),
    ("The answer is 42.\n", FALLBACK, "42."),
]


@pytest.mark.parametrize("text,strict,flexible", CASES)
def test_extraction_by_hand(text, strict, flexible):
    assert strict_extract(text) == strict
    assert flexible_extract(text) == flexible


@pytest.mark.parametrize("pred,ref,same", [
    ("1,234.", "Some work.\n#### 1234", True),  # comma and trailing period removed
    ("$18", "#### 18", True),  # dollar sign removed
    ("-5", "It is cold.\n#### -5", True),
    ("3.5", "#### 3.5", True),
    ("1,000.00", "#### 1000", False),  # only a final "." goes, not the decimals
    ("18", "#### 81", False),
    (FALLBACK, "#### 18", False),
    ("ABC", "abc", True),  # ignore_case
])
def test_exact_match_normalisation(pred, ref, same):
    assert exact_match(pred, ref) is same


def test_normalize_order_matters_as_in_lm_eval():
    # "," goes before "(?s).*#### ", so a comma in the reasoning does not survive; "\.$" is applied last
    assert normalize("a, b\n#### 1,000.") == "1000"
    assert normalize("Line one.\nLine two #### 5", regexes_to_ignore=GSM8K_IGNORE) == "5"


def test_truncate_at_stop_each_term_in_turn():
    assert truncate_at_stop(" 7 apples\n\nQuestion: next", ["Question:", "\n\n"]) == " 7 apples"
    assert truncate_at_stop("abc<|im_end|>def", ["", "<|im_end|>"]) == "abc"
    assert truncate_at_stop("nothing to cut", []) == "nothing to cut"


def test_gsm8k_scores_both_filters():
    s = gsm8k_scores(" She has 3 + 4 = 7 apples.\n#### 7", "He has 3 + 4 = 7 apples.\n#### 7")
    assert s == {"strict": "7", "flexible": "7", "strict_match": True, "flexible_match": True}
    s = gsm8k_scores(" The answer is 7.", "#### 7")
    assert (s["strict_match"], s["flexible_match"]) == (False, True)


def _lm_eval_gsm8k():
    """lm-eval's filters and metric configured from its installed gsm8k.yaml."""
    pytest.importorskip("lm_eval")
    import os

    import yaml
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    filters = {}
    for entry in config["filter_list"]:
        regex = entry["filter"][0]
        filters[entry["name"]] = RegexFilter(regex_pattern=regex["regex_pattern"],
                                             group_select=regex.get("group_select", 0))
    metric = {k: v for k, v in config["metric_list"][0].items() if k in ("regexes_to_ignore", "ignore_case",
                                                                        "ignore_punctuation")}
    return config, filters, metric, exact_match_hf_evaluate


def test_constants_match_installed_gsm8k_yaml():
    config, _, metric, _ = _lm_eval_gsm8k()
    from matryoshka_lora.evaluation import extract

    assert tuple(config["generation_kwargs"]["until"]) == extract.GSM8K_STOP
    assert tuple(metric["regexes_to_ignore"]) == extract.GSM8K_IGNORE
    assert (metric["ignore_case"], metric["ignore_punctuation"]) == (True, False)
    patterns = {e["name"]: e["filter"][0]["regex_pattern"] for e in config["filter_list"]}
    assert patterns == {"strict-match": extract.STRICT_REGEX, "flexible-extract": extract.FLEXIBLE_REGEX}
    assert config["doc_to_text"] == "Question: {{question}}\nAnswer:"


@pytest.mark.parametrize("text", [c[0] for c in CASES] + [
    " 1,234,567 and then -0.5", "$-3", "-$4.", "costs .5 dollars", "#### $100", "12,", "answer: 6\n\n7",
])
@pytest.mark.parametrize("reference", ["#### 18", "Work.\n#### 1,234", "#### -5", "#### 3.5", "#### 7", "#### 42"])
def test_agrees_with_lm_eval(text, reference):
    _, filters, metric, exact_match_hf_evaluate = _lm_eval_gsm8k()
    ours = gsm8k_scores(text, reference)
    for name, key in (("strict-match", "strict"), ("flexible-extract", "flexible")):
        theirs = filters[name].apply([[text]], None)[0][0]
        assert ours[key] == theirs
        score = exact_match_hf_evaluate([theirs], [reference], **metric)["exact_match"]
        assert ours[f"{key}_match"] == bool(score)
