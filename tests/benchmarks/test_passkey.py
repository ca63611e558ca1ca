"""The passkey prompts (benchmarks/passkey.py): length, where the key sits, how the answer is judged."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from benchmarks import passkey


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir(64)))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("depth", passkey.DEPTHS)
def test_the_key_sits_at_its_depth_of_a_prompt_that_fits(tokenizer, length, depth):
    ids = passkey.build_prompt(tokenizer, length, depth, "12345")
    filler = len(tokenizer(passkey.FILLER, add_special_tokens=False)["input_ids"])
    assert length - filler < len(ids) <= length  # whole fillers up to the length
    text = tokenizer.decode(ids)
    assert text.startswith(passkey.PREAMBLE.strip()) and text.endswith(passkey.QUESTION)
    assert text.count("12345") == 2  # the needle says it twice, nothing else does
    start, end = len(passkey.PREAMBLE), len(text) - len(passkey.QUESTION)
    assert abs((text.index("12345") - start) / (end - start) - depth) < 0.02


def test_cases_are_seeded_five_digit_keys():
    first, again = passkey.cases([4096, 8192], 2, seed=0), passkey.cases([4096, 8192], 2, seed=0)
    assert first == again and len(first) == 2 * len(passkey.DEPTHS) * 2
    assert all(len(c["key"]) == 5 and c["key"].isdigit() for c in first)
    assert first != passkey.cases([4096, 8192], 2, seed=1)


def test_summary_counts_found_keys_per_length():
    results = [{"length": 4096, "found": True, "seconds": 2.0}, {"length": 4096, "found": False, "seconds": 4.0},
               {"length": 8192, "found": True, "seconds": 9.0}]
    summary = passkey.summarize(passkey.KVConfig("auto", "auto"), results)
    assert summary["by_length"] == {"4096": {"found": 1, "total": 2, "seconds_mean": 3.0},
                                    "8192": {"found": 1, "total": 1, "seconds_mean": 9.0}}
