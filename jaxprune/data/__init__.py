"""Text windows, bundled public-domain texts, tokenizers, generated math word problems."""

from jaxprune.data.text import (
    BUNDLED_TEXTS,
    CALIBRATION_TEXTS,
    EVALUATION_TEXT,
    bundled_text,
    read_text,
    eval_windows,
    paragraphs_joined,
    calibration_windows,
)
from jaxprune.data.tokenization import (
    CharTokenizer,
    Tokenizer,
    from_gguf,
    from_directory,
)
from jaxprune.data.math_problems import (
    HELD_OUT_TEMPLATES,
    PRUNING_TEMPLATES,
    TEMPLATES,
    Problem,
    problems,
    reasoning_prompt,
    worked_example,
)
