"""No whole training text twice (issue 22.3): the run's index of whole short texts, and `unique`
replies that equal one or hold more than half of one are drawn again."""

import dataclasses

import numpy as np

from botkit.engine.copy_index import CopyIndex
from botkit.engine.engine import Engine
from botkit.engine.training_texts import TEXTS_JSON, TrainingTexts, document_lines, write_texts
from botkit.params import SamplingParams

EXCUSES = [
    "My dog ate the report.",
    "The train was late again, sorry!",
    "I thought the meeting was tomorrow.",
    "Wi-Fi down.",
]


def test_equal_after_case_and_spaces_or_more_than_half_is_covered():
    texts = TrainingTexts.build(EXCUSES)
    assert texts.covered("my  DOG ate the report .") == 1.0  # case and spaces do not matter
    assert texts.covered("Hello there.\nWi-Fi   down.") == 1.0  # a line of the reply is a training text
    # "i thought the meeting was tomorrow ." is 7 words: 4 of them in a row are more than half
    assert texts.covered("Honestly I thought the meeting ended.") == 4 / 7
    # 4 of the 6 words of "my dog ate the report ."
    assert texts.covered("My dog ate the homework, not the report") == 4 / 9
    assert texts.covered("so I thought the plan was fine") == 0.0  # 3 in a row: not more than half
    assert texts.covered("The Wi-Fi is down.") == 0.0  # "wi - fi down ." is too short for a half: only equal counts
    assert texts.covered("A dog ate my report.") == 0.0


def test_the_run_folder_keeps_the_texts_and_refuses_a_foreign_index(tmp_path, tiny_lm):
    tok = tiny_lm.tokenizer
    eos = tok.eos_token_id
    stream = np.array(
        [t for line in EXCUSES[:2] for t in tok(line).input_ids + [eos]] + tok("\n".join(EXCUSES[2:])).input_ids
    )
    assert list(document_lines(stream, eos, tok.decode)) == EXCUSES  # documents split at end of text, then at newlines
    write_texts(tmp_path, document_lines(stream, eos, tok.decode))
    loaded = TrainingTexts.load(tmp_path)
    assert (
        loaded is not None
        and loaded.covered("wi-fi down.") == 1.0
        and loaded.covered("The train was late again") == 5 / 5
    )
    meta = (tmp_path / TEXTS_JSON).read_text()
    (tmp_path / TEXTS_JSON).write_text(meta.replace("blake2b64", "md5"))
    assert TrainingTexts.load(tmp_path) is None


def test_a_unique_reply_that_is_a_training_text_is_drawn_again(tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=0, seed=5)
    plain = Engine(tiny_lm, 1)
    first = plain.add(ids, params)
    while plain.has_work:
        plain.step()
    assert first.text.strip()
    engine = Engine(tiny_lm, 1)
    # a 5-token "training text"
    engine._index = CopyIndex(np.zeros(0, dtype=np.uint64), texts=TrainingTexts.build([first.text.upper()]))
    seq = engine.add(ids, dataclasses.replace(params, unique=True))
    while engine.has_work:
        engine.step()
    assert seq.attempts[0].text == first.text and seq.attempts[0].copies  # the same first draw, judged a copy...
    assert len(seq.attempts) >= 2 and not seq.result.copies and seq.text != first.text  # ...so another was sent
