import json
from pathlib import Path

import pytest

from raylign.common.preference_data import (
    GENRM_INSTRUCTION,
    PreferenceExample,
    adapt_hh_rlhf,
    check_disjoint_splits,
    declared_test_split,
    detect_format,
    hold_out_test,
    imdb_prompt,
    load_preference_data,
    parse_genrm_score,
    prompt_bucket,
    split_by_prompt,
    write_preference_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures"


def raw_rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


# ----- adapters on the fixtures (real schemas) -----


def test_imdb_rows_become_labelled_prompts_of_one_or_two_sentences():
    examples = load_preference_data(str(FIXTURES / "imdb.jsonl"), "imdb")
    assert [e.label for e in examples] == [row["label"] for row in raw_rows("imdb.jsonl")]
    assert all(len(e.prompt) <= 200 and e.chosen is None and e.rejected is None for e in examples)
    # "U.S. customs" is not a sentence end; the two sentences do not fit in 200 characters, so one is kept.
    assert examples[0].prompt == ("I rented I AM CURIOUS-YELLOW from my video store because of all the controversy "
                                  "that surrounded it when it was first released in 1967.")
    assert examples[1].prompt == "This is one of the best films I have seen in years! The cast is wonderful and the script never drags."
    assert examples[4].prompt == "Brilliant. Simply brilliant."
    # HTML line breaks are gone from the full text kept for a classifier.
    assert "<br" not in examples[2].extra["text"] and examples[2].extra["text"].endswith("at all. Avoid.")


def test_imdb_prompt_without_sentence_end_is_cut_at_a_word_to_200_chars():
    prompt = imdb_prompt("word " * 100)
    assert len(prompt) <= 200 and prompt.endswith("word") and len(prompt) > 190


def test_hh_rlhf_splits_shared_context_from_final_replies():
    rows = raw_rows("hh_rlhf.jsonl")
    examples = load_preference_data(str(FIXTURES / "hh_rlhf.jsonl"), "Anthropic/hh-rlhf")
    for row, example in zip(rows, examples):
        assert example.prompt + example.chosen == row["chosen"]
        assert example.prompt + example.rejected == row["rejected"]
        assert example.prompt.endswith("\n\nAssistant:")
    assert examples[0].chosen == " I haven't even thought about it." and examples[0].rejected == " Ass."
    assert examples[0].extra["prompt_messages"] == [
        {"role": "user", "content": "What are some cuss words in english?"},
        {"role": "assistant", "content": "Here’s an incomplete list."},
        {"role": "user", "content": "What's your favorite one?"},
    ]
    # Replies that start alike still split at the last shared Assistant marker.
    assert examples[2].chosen == " Sure, what subject is it?"
    # A chosen dialogue that goes on for more turns keeps them in its completion.
    assert examples[3].prompt == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert examples[3].chosen.endswith("\n\nHuman: Thanks!\n\nAssistant: You're welcome.")


def test_hh_rlhf_without_any_assistant_turn_has_an_empty_prompt():
    example = adapt_hh_rlhf({"chosen": "Hello there", "rejected": "Go away"})
    assert example.prompt == "" and example.chosen == "Hello there" and example.extra["prompt_messages"] == []


def test_ultrafeedback_message_lists_become_final_replies_with_scores():
    examples = load_preference_data(str(FIXTURES / "ultrafeedback_binarized.jsonl"), "HuggingFaceH4/ultrafeedback_binarized")
    assert len(examples) == 4
    second = examples[1]
    assert second.prompt == "Name three primary colors."
    assert second.chosen == "Red, yellow and blue are the traditional primary colors." and second.rejected == "Green."
    assert second.extra["score_chosen"] == 9.0 and second.extra["score_rejected"] == 2.0
    assert second.extra["prompt_messages"] == [{"role": "user", "content": "Name three primary colors."}]
    assert second.extra["prompt_id"] == "a1b2"


def test_orca_system_prompt_becomes_first_chat_message():
    examples = load_preference_data(str(FIXTURES / "orca_dpo_pairs.jsonl"), "orca")
    third = examples[2]
    assert third.prompt == "What is the capital of France?" and third.rejected == "London."
    assert third.prompt_messages() == [
        {"role": "system", "content": "You are a helpful assistant, who always provide explanation."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert examples[3].prompt_messages() == [{"role": "user", "content": examples[3].prompt}]


def test_generic_jsonl_keeps_other_columns_as_extra_and_filters_by_split_column():
    examples = load_preference_data(str(FIXTURES / "preferences.jsonl"), "jsonl", split="test")
    assert [e.prompt for e in examples] == ["Summarise: the cat sat on the mat.", "Name a fruit."]
    assert examples[0].extra == {"category": "summary"}
    assert len(load_preference_data(str(FIXTURES / "preferences.jsonl"), "jsonl")) == 4


def test_generic_jsonl_renames_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "good": "4", "bad": "5"}) + "\n")
    [example] = load_preference_data(str(path), "jsonl", columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (example.prompt, example.chosen, example.rejected, example.extra) == ("2+2?", "4", "5", {})


def test_format_is_detected_from_columns_of_each_fixture():
    expected = {"imdb.jsonl": "imdb", "hh_rlhf.jsonl": "hh-rlhf", "ultrafeedback_binarized.jsonl": "ultrafeedback",
                "orca_dpo_pairs.jsonl": "orca", "preferences.jsonl": "jsonl"}
    for name, format in expected.items():
        assert detect_format(raw_rows(name)[0].keys()) == format
        assert load_preference_data(str(FIXTURES / name)) == load_preference_data(str(FIXTURES / name), format)


def test_written_examples_read_back_unchanged(tmp_path):
    examples = load_preference_data(str(FIXTURES / "orca_dpo_pairs.jsonl"), "orca")
    path = write_preference_jsonl(tmp_path / "orca.jsonl", examples)
    assert load_preference_data(str(path), "jsonl") == examples


def test_bad_rows_and_sources_name_the_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 1.0, "score_rejected": 0.0}) + "\n")
    with pytest.raises(ValueError, match="row 0 does not fit the 'ultrafeedback' format.*'chosen' must be a non-empty list"):
        load_preference_data(str(path), "ultrafeedback")
    with pytest.raises(ValueError, match="format = 'csvish' is unknown"):
        load_preference_data(str(path), "csvish")
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_data(str(tmp_path / "missing.jsonl"), "jsonl")


def test_hub_source_without_network_names_the_local_fallback(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not load 'Anthropic/hh-rlhf'.*local .jsonl file"):
        load_preference_data("Anthropic/hh-rlhf", split="train")


# ----- disjoint splits -----


def many_examples(n=400):
    # Every prompt twice, as hh-rlhf has several pairs per context.
    return [PreferenceExample(prompt=f"prompt number {i // 2}", chosen=f"c{i}", rejected=f"r{i}") for i in range(n)]


def test_splits_are_disjoint_deterministic_and_independent_of_row_order():
    examples = many_examples()
    fractions = {"rm": 0.3, "policy": 0.5, "val": 0.1, "test": 0.1}
    first = split_by_prompt(examples, fractions)
    again = split_by_prompt(list(reversed(examples)), fractions)
    assert {name: sorted(e.chosen for e in rows) for name, rows in first.items()} == \
        {name: sorted(e.chosen for e in rows) for name, rows in again.items()}
    assert sum(len(rows) for rows in first.values()) == len(examples)
    assert 0.2 < len(first["rm"]) / len(examples) < 0.4 and 0.4 < len(first["policy"]) / len(examples) < 0.6
    prompts = {name: {e.prompt for e in rows} for name, rows in first.items()}
    names = list(prompts)
    assert all(prompts[a].isdisjoint(prompts[b]) for a in names for b in names if a < b)
    assert split_by_prompt(examples, fractions, salt="other")["rm"] != first["rm"]
    assert 0 <= prompt_bucket("x") < 1 and prompt_bucket("x") == prompt_bucket("  x ")


def test_fixed_test_split_removes_its_prompts_from_the_others():
    train = many_examples()
    test = [PreferenceExample(prompt="prompt number 3"), PreferenceExample(prompt="held out only")]
    splits = split_by_prompt(train, {"rm": 0.2, "policy": 0.4, "val": 0.08}, fixed={"test": test})
    assert splits["test"] == test
    assert all(e.prompt != "prompt number 3" for name in ("rm", "policy", "val") for e in splits[name])
    # Fractions below 1 in total leave the rest unused, as the seed's table does.
    assert sum(len(splits[n]) for n in ("rm", "policy", "val")) < len(train) * 0.8


def test_check_disjoint_splits_names_the_leaked_prompt_and_both_splits():
    splits = {"rm": [PreferenceExample(prompt="a"), PreferenceExample(prompt="shared  prompt")],
              "test": [PreferenceExample(prompt="shared prompt")]}
    with pytest.raises(ValueError, match="'shared prompt' appears in splits 'rm' and 'test'"):
        check_disjoint_splits(splits)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1.200"):
        split_by_prompt(many_examples(4), {"rm": 0.6, "policy": 0.6})
    with pytest.raises(ValueError, match="split fraction rm = 0"):
        split_by_prompt(many_examples(4), {"rm": 0})


# ----- held-out test splits -----


def test_each_seed_data_set_declares_its_held_out_test_split():
    assert declared_test_split("stanfordnlp/imdb") == declared_test_split("imdb") == "test"
    assert declared_test_split("Anthropic/hh-rlhf") == "test"
    assert declared_test_split("HuggingFaceH4/ultrafeedback_binarized") == "test_prefs"
    assert declared_test_split("HuggingFaceH4/ultrafeedback_binarized", "ultrafeedback-genrm") == "test_prefs"
    # Orca has no test split, nor has a local file: their test prompts are a hash hold-out.
    assert declared_test_split("Intel/orca_dpo_pairs") is None
    assert declared_test_split(str(FIXTURES / "hh_rlhf.jsonl")) is None


def test_the_hold_out_is_the_same_prompts_whatever_the_row_order_or_the_training_fractions():
    examples = many_examples(2000)
    rest, test = hold_out_test(examples, 0.1)
    again_rest, again_test = hold_out_test(list(reversed(examples)), 0.1)
    assert sorted(e.chosen for e in test) == sorted(e.chosen for e in again_test)
    assert 0.07 < len(test) / len(examples) < 0.13 and len(rest) + len(test) == len(examples)
    for fractions in ({"rm": 0.5, "policy": 0.4, "val": 0.1}, {"train": 0.9, "val": 0.1}):
        splits = split_by_prompt(rest, fractions, fixed={"test": test})
        assert splits["test"] == test  # disjointness is checked by split_by_prompt
    with pytest.raises(ValueError, match="test hold-out fraction = 1.0: must be in \\(0, 1\\)"):
        hold_out_test(examples, 1.0)


def offline_stage(source: str, **data):
    from raylign.common.pipeline_config import SftStage

    return SftStage.model_validate({"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny-llama"},
                                    "data": {"source": source, **data}})


def test_an_offline_stage_reads_the_declared_test_split_or_holds_one_out():
    from raylign.learner.offline_jobs import load_stage_examples, load_stage_test_split

    stage = offline_stage(str(FIXTURES / "preferences.jsonl"), format="jsonl", test_split="test")
    train, test = load_stage_test_split(stage, load_stage_examples(stage))
    assert [e.prompt for e in test] == ["Summarise: the cat sat on the mat.", "Name a fruit."]
    stage = offline_stage("builtin:movie-preferences", max_rows=400)
    train, test = load_stage_test_split(stage, load_stage_examples(stage))
    assert len(train) + len(test) == 400 and {e.prompt for e in train}.isdisjoint(e.prompt for e in test)
    assert load_stage_test_split(offline_stage("builtin:movie-preferences", test_split=None), [])[1] is None


def test_a_fraction_named_test_next_to_a_held_out_test_split_is_refused():
    with pytest.raises(ValueError, match="names a split 'test', but the stage holds out its own test split .*rename that fraction"):
        offline_stage("builtin:movie-preferences", fractions={"train": 0.9, "test": 0.1}, eval_split="test")
    assert offline_stage("builtin:movie-preferences", fractions={"train": 0.9, "test": 0.1}, eval_split="test", test_split=None)


# ----- GenRM data (seed gemma_ultrafeedback) -----


def test_genrm_rows_put_prompt_and_chosen_answer_in_the_user_turn_and_the_score_in_the_reply():
    examples = load_preference_data(str(FIXTURES / "ultrafeedback_binarized.jsonl"), "ultrafeedback-genrm")
    rows = raw_rows("ultrafeedback_binarized.jsonl")
    second = examples[1]
    assert second.prompt == ("User: Name three primary colors.\n\nAssistant: Red, yellow and blue are the traditional "
                             f"primary colors.\n\n{GENRM_INSTRUCTION}")
    assert second.chosen == "Score: 9.0/10. The response is helpful, harmless, and honest."
    assert second.rejected is None and second.prompt_messages() == [{"role": "user", "content": second.prompt}]
    # The score regex reads every judgement back: only score_chosen is used.
    assert [parse_genrm_score(e.chosen) for e in examples] == [row["score_chosen"] for row in rows]
    # Splits hash the original prompt, so the SFT rows fall in the same splits as the RM's rows of that prompt.
    plain = load_preference_data(str(FIXTURES / "ultrafeedback_binarized.jsonl"), "ultrafeedback")
    fractions = {"sft": 0.5, "rm": 0.5}
    assert {name: [e.extra["source_prompt"] for e in rows] for name, rows in split_by_prompt(examples, fractions).items()} == \
        {name: [e.prompt for e in rows] for name, rows in split_by_prompt(plain, fractions).items()}


def test_genrm_score_regex_reads_the_first_score_out_of_ten():
    assert parse_genrm_score("Score: 7.5/10. Mostly helpful.") == 7.5
    assert parse_genrm_score("I'd say Score:10/10, then Score: 3/10") == 10.0
    assert parse_genrm_score("Score: 7.5 out of 10") is None and parse_genrm_score("") is None
