"""Tasks: datasets (ARC, GSM8K, MATH), prompts, answer extraction, rewards.

>>> from drllm.tasks import load_task, score_choices
>>> exs = load_task("arc_easy", "validation", data_dir="data", limit=8)   # doctest: +SKIP
>>> res = score_choices(model, tokenizer, exs, batch_size=8)              # doctest: +SKIP
>>> [r.correct for r in res], [r.margin for r in res]                     # doctest: +SKIP
"""

from .._lazy import lazy_attributes
from .data import (
    ARC_TASKS,
    DATA_DIR_ENV,
    DEFAULT_SPLITS,
    EMBEDDED,
    HF_DATASETS,
    TASKS,
    DataFormatError,
    DataUnavailableError,
    Example,
    examples_from_records,
    gsm8k_gold,
    last_boxed,
    load_jsonl,
    load_task,
    parse_record,
)
from .extract import (
    extract_answer,
    extract_choice,
    extract_gsm8k_answer,
    extract_math_answer,
    is_correct,
    math_equal,
    normalize_number,
    numbers_equal,
)
from .prompts import (
    cloze_context,
    cloze_requests,
    display_labels,
    encode_prompt,
    generation_prompt,
    question_text,
    use_chat_template,
)

# rewards needs torch: loaded on first use, so the CLI can read task names and data without it
_LAZY = {name: ".rewards" for name in (
    "ChoiceScore", "Generation", "accuracy", "choice_requests", "choice_scores_from_loglikelihoods",
    "encode_request", "generate_answers", "generation_rewards", "loglikelihood", "score_choices",
)}
__getattr__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = [
    "ARC_TASKS",
    "DATA_DIR_ENV",
    "DEFAULT_SPLITS",
    "EMBEDDED",
    "HF_DATASETS",
    "TASKS",
    "DataFormatError",
    "DataUnavailableError",
    "Example",
    "examples_from_records",
    "gsm8k_gold",
    "last_boxed",
    "load_jsonl",
    "load_task",
    "parse_record",
    "extract_answer",
    "extract_choice",
    "extract_gsm8k_answer",
    "extract_math_answer",
    "is_correct",
    "math_equal",
    "normalize_number",
    "numbers_equal",
    "cloze_context",
    "cloze_requests",
    "display_labels",
    "encode_prompt",
    "generation_prompt",
    "question_text",
    "use_chat_template",
    "ChoiceScore",
    "Generation",
    "accuracy",
    "choice_requests",
    "choice_scores_from_loglikelihoods",
    "encode_request",
    "generate_answers",
    "generation_rewards",
    "loglikelihood",
    "score_choices",
]
