"""Reward sources combined with weights, per-source components, invalid samples, running normalisation, config."""

import math

import pytest
from pydantic import ValidationError

from raylign.actors.heuristic_reward import length_score
from raylign.actors.reward_worker import RewardError, RewardWorker, check_invalid_fraction
from raylign.actors.rewards import RunningNormalizer, vader_sentiment
from raylign.common.config import RewardConfig, RunConfig
from raylign.common.types import RewardResult, Sample

PROMPT = "The movie was"


def make_samples(completions, extra=None):
    return [Sample(prompt_index=i // 2, sample_index=i % 2, prompt=PROMPT, prompt_ids=[1], completion=c,
                   completion_ids=[2], behaviour_logprobs=[0.0], policy_version=3, finish_reason="stop",
                   extra=dict(extra[i]) if extra else {})
            for i, c in enumerate(completions)]


def worker(*sources, **settings):
    return RewardWorker(RewardConfig(sources=list(sources), **settings))


# User reward functions, referenced as tests.test_reward_sources:<name>.

def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def constant_one(prompts, completions):
    return [1.0] * len(completions)


def label_reward(prompts, completions, label):
    return [1.0 if lab == "pos" else -1.0 for lab in label]


def scaled_length(prompts, completions, scale=1.0):
    return [scale * len(c) for c in completions]


async def async_length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def raises_on_bad(prompts, completions):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def mixed_garbage(prompts, completions):
    return [1.0, math.nan, math.inf, None][: len(completions)]


def too_few(prompts, completions):
    return [1.0]


def test_vader_source_scores_like_the_function():
    completions = [" great and wonderful.", " awful and boring."]
    result = worker({"name": "vader_sentiment"}).score_batch(make_samples(completions))
    assert result.rewards == pytest.approx(vader_sentiment([PROMPT] * 2, completions))
    assert result.components == {"vader_sentiment": result.rewards} and result.errors == []


def test_heuristic_source_takes_its_config_from_options():
    weights = {"relevance": 0, "length": 1, "sentiment": 0, "diversity": 0, "punctuation": 0, "engagement": 0}
    completions = ["short.", "x" * 30]
    source = {"name": "heuristic_reply", "options": {"weights": weights, "min_chars": 20, "max_chars": 40}}
    rewards = worker(source).score_batch(make_samples(completions)).rewards
    assert rewards == pytest.approx([length_score(c, 20, 40) for c in completions])
    assert rewards[1] == 1.0 and rewards[0] < 0.2


def test_bad_heuristic_options_name_the_source_field():
    with pytest.raises(ValueError, match=r"reward\.sources\[0\]\.options = .*min_chars"):
        worker({"name": "heuristic_reply", "options": {"min_chars": -1}})


def test_options_a_registered_function_does_not_take_are_refused():
    with pytest.raises(ValueError, match=r"'vader_sentiment' takes no options; remove them"):
        worker({"name": "vader_sentiment", "options": {"scale": 2}})


def test_user_function_gets_only_the_extra_columns_it_names():
    extra = [{"label": "pos", "other": 1}, {"label": "neg", "other": 2}]
    result = worker({"name": "tests.test_reward_sources:label_reward"}).score_batch(make_samples(["a", "b"], extra))
    assert result.rewards == [1.0, -1.0] and result.errors == []


def test_user_function_options_are_passed_as_keyword_arguments():
    source = {"name": "tests.test_reward_sources:scaled_length", "options": {"scale": 0.5}}
    assert worker(source).score_batch(make_samples(["ab", "abcd"])).rewards == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"does not accept them"):
        worker({"name": "tests.test_reward_sources:scaled_length", "options": {"size": 2}})


def test_async_user_function_is_awaited():
    assert worker({"name": "tests.test_reward_sources:async_length"}).score(make_samples(["abc", ""])) == [3.0, 0.0]


def test_unknown_source_name_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"reward\.sources\[1\]\.name = 'nope' is unknown"):
        worker({"name": "vader_sentiment"}, {"name": "nope"})
    with pytest.raises(ValueError, match=r"reward\.function = 'nope' is unknown"):
        RewardWorker("nope")


def test_weighted_sources_add_up_and_each_is_logged_raw():
    result = worker(
        {"name": "tests.test_reward_sources:length_reward", "weight": 0.5},
        {"name": "tests.test_reward_sources:constant_one", "weight": -2.0, "label": "bias"},
    ).score_batch(make_samples(["ab", "abcdef"]))
    assert result.components == {"length_reward": [2.0, 6.0], "bias": [1.0, 1.0]}
    assert result.rewards == [0.5 * 2 - 2.0, 0.5 * 6 - 2.0] == result.raw_rewards
    metrics = result.metrics()
    assert metrics["reward/length_reward"] == 4.0 and metrics["reward/bias"] == 1.0
    assert metrics["reward/invalid_count"] == 0.0 and "time/reward_bias_s" in metrics


def test_a_raising_source_marks_its_samples_invalid_with_the_exception():
    samples = make_samples(["fine", "bad one", "ok"])
    result = worker(
        {"name": "tests.test_reward_sources:raises_on_bad"}, {"name": "tests.test_reward_sources:length_reward"}
    ).score_batch(samples)
    assert result.rewards == [None, None, None] and result.invalid_count == 3
    assert result.components["length_reward"] == [4.0, 7.0, 2.0]
    assert [e["index"] for e in result.errors] == [0, 1, 2]
    first = result.errors[1]
    assert first["source"] == "raises_on_bad" and first["error"] == "ValueError: cannot score 'bad'"
    assert first["prompt"] == PROMPT and first["completion"] == "bad one" and first["policy_version"] == 3
    assert "raise ValueError" in first["traceback"]


def test_batch_size_limits_a_raising_call_to_its_own_chunk():
    result = worker({"name": "tests.test_reward_sources:raises_on_bad"}, batch_size=2).score_batch(
        make_samples(["fine", "good", "bad", "ok", "nice"])
    )
    assert result.rewards == [1.0, 1.0, None, None, 1.0]
    assert [e["index"] for e in result.errors] == [2, 3]


def test_nan_inf_and_none_scores_mark_only_those_samples_invalid():
    result = worker({"name": "tests.test_reward_sources:mixed_garbage"}).score_batch(make_samples(["a", "b", "c", "d"]))
    assert result.rewards == [1.0, None, None, None]
    assert result.components["mixed_garbage"] == [1.0, None, None, None]
    assert [(e["index"], e["error"]) for e in result.errors] == [
        (1, "returned a non-finite score (nan)"), (2, "returned a non-finite score (inf)"), (3, "returned a non-finite score (None)"),
    ]
    assert result.invalid_indices == [1, 2, 3] and result.metrics()["reward/invalid_fraction"] == 0.75


def test_wrong_number_of_scores_marks_the_call_invalid():
    result = worker({"name": "tests.test_reward_sources:too_few"}).score_batch(make_samples(["a", "b"]))
    assert result.rewards == [None, None]
    assert result.errors[0]["error"] == "returned 1 scores for 2 samples; return one float per sample"


def test_a_failure_outside_the_sources_marks_the_whole_batch_invalid_with_the_cause(monkeypatch):
    scorer = worker({"name": "vader_sentiment"})

    def broken(samples):
        raise RuntimeError("worker bug")

    monkeypatch.setattr(scorer, "_score", broken)
    result = scorer.score_batch(make_samples(["a", "b"]))
    assert result.rewards == [None, None] and result.components == {"vader_sentiment": [None, None]}
    assert [(e["index"], e["source"], e["error"]) for e in result.errors] == [
        (0, "reward_worker", "RuntimeError: worker bug"), (1, "reward_worker", "RuntimeError: worker bug"),
    ]


def test_score_still_raises_for_the_driver_when_a_sample_is_invalid():
    with pytest.raises(RewardError, match=r"1 of 2 samples have no valid reward; first: sample 1, source 'mixed_garbage'"):
        worker({"name": "tests.test_reward_sources:mixed_garbage"}).score(make_samples(["a", "b"]))


def test_running_normalizer_matches_hand_computed_ema_statistics():
    normalizer = RunningNormalizer(momentum=0.5, eps=0.0)
    # First batch sets the statistics: mean 2, var 1.
    assert normalizer([1.0, 3.0]) == pytest.approx([-1.0, 1.0])
    # Second batch mean 6, var 1: mean = 0.5*2 + 0.5*6 = 4; var = 0.5*1 + 0.5*1 + 0.25*(6-2)^2 = 5.
    assert normalizer([5.0, None, 7.0]) == pytest.approx([1 / math.sqrt(5), None, 3 / math.sqrt(5)])
    assert (normalizer.mean, normalizer.var, normalizer.count) == (4.0, 5.0, 4)
    restored = RunningNormalizer(momentum=0.5, eps=0.0)
    restored.load_state_dict(normalizer.state_dict())
    assert restored([4.0]) == normalizer([4.0])


def test_worker_normalises_the_weighted_total_and_keeps_components_raw():
    scorer = worker({"name": "tests.test_reward_sources:length_reward", "weight": 2.0}, normalize="running", ema_momentum=0.5)
    first = scorer.score_batch(make_samples(["a", "abc"]))
    assert first.raw_rewards == [2.0, 6.0] and first.rewards == pytest.approx([-1.0, 1.0])
    second = scorer.score_batch(make_samples(["aaaaa", "aaaaaaa"]))
    # Totals 10 and 14: mean 0.5*4 + 0.5*12 = 8; var 0.5*4 + 0.5*4 + 0.25*64 = 20.
    assert second.rewards == pytest.approx([2 / math.sqrt(20), 6 / math.sqrt(20)])
    assert second.components["length_reward"] == [5.0, 7.0]
    assert second.stats["reward/running_mean"] == 8.0 and scorer.normalizer_state()["var"] == 20.0


def test_invalid_fraction_above_the_threshold_stops_with_the_cause():
    result = worker({"name": "tests.test_reward_sources:mixed_garbage"}).score_batch(make_samples(["a", "b", "c", "d"]))
    check_invalid_fraction(result, 0.75, step=5)
    with pytest.raises(RewardError, match=r"step 5: 3 of 4 samples .*returned a non-finite score \(nan\).*reward\.max_invalid_fraction = 0\.5"):
        check_invalid_fraction(result, 0.5, step=5)


def test_concat_joins_shares_and_shifts_error_indices():
    a = worker({"name": "tests.test_reward_sources:mixed_garbage"}).score_batch(make_samples(["a", "b"]), normalize=False)
    b = worker({"name": "tests.test_reward_sources:mixed_garbage"}).score_batch(make_samples(["c", "d"]), normalize=False)
    joined = RewardResult.concat([a, b])
    assert joined.raw_rewards == [1.0, None, 1.0, None] and joined.components["mixed_garbage"] == joined.raw_rewards
    assert [e["index"] for e in joined.errors] == [1, 3]


# --- reward models as sources -------------------------------------------------


@pytest.fixture(scope="module")
def saved_reward_models(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForSequenceClassification

    from raylign.common.reward_models import ClassifierRewardModel, ScalarRewardModel, SequenceClassificationRewardModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("reward-models")
    models = {
        "scalar_rm": ScalarRewardModel.from_base(tiny_model_dir),
        "classifier_rm": ClassifierRewardModel.from_base(tiny_model_dir),
        "seqcls_rm": SequenceClassificationRewardModel(
            AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1),
            ClassifierRewardModel.from_base(tiny_model_dir).tokenizer,
        ),
    }
    return {name: (str(model.save_pretrained(root / name)), model.eval()) for name, model in models.items()}


@pytest.mark.parametrize("kind", ["scalar_rm", "seqcls_rm"])
def test_pairwise_reward_model_source_scores_pairs_as_reward_training_encodes_them(saved_reward_models, kind):
    path, model = saved_reward_models[kind]
    completions = [" great fun.", "dull.", " a long and boring film"]
    result = worker({"name": kind, "path": path}, batch_size=2).score_batch(make_samples(completions))
    expected = model.score_prompt_completions([PROMPT] * 3, completions)
    assert result.components[kind] == pytest.approx(expected, abs=1e-5) and result.errors == []


def test_classifier_source_scores_the_text_prompt_plus_completion(saved_reward_models):
    path, model = saved_reward_models["classifier_rm"]
    completions = [" great fun.", " dull."]
    result = worker({"name": "classifier_rm", "path": path}).score_batch(make_samples(completions))
    assert result.rewards == pytest.approx(model.score_texts([PROMPT + c for c in completions]), abs=1e-5)
    assert all(0 < r < 1 for r in result.rewards)


@pytest.mark.parametrize("kind", ["scalar_rm", "seqcls_rm", "classifier_rm"])
def test_reward_model_source_scores_the_templated_prompt_and_completion(saved_reward_models, kind):
    path, model = saved_reward_models[kind]
    template = "{prompt} ->{completion}"
    completions = [" great fun.", " dull.", " a long and boring film"]
    result = worker({"name": kind, "path": path, "options": {"template": template}}, batch_size=2).score_batch(
        make_samples(completions)
    )
    expected = model.score_texts([template.format(prompt=PROMPT, completion=c) for c in completions])
    assert result.components[kind] == pytest.approx(expected, abs=1e-5) and result.errors == []
    if kind == "classifier_rm":
        assert all(0 < r < 1 for r in result.rewards)


def test_reward_model_and_function_sources_combine(saved_reward_models):
    path, model = saved_reward_models["scalar_rm"]
    completions = [" great fun.", " dull."]
    result = worker(
        {"name": "scalar_rm", "path": path, "weight": 0.5}, {"name": "vader_sentiment", "weight": 2.0}
    ).score_batch(make_samples(completions))
    rm = model.score_prompt_completions([PROMPT] * 2, completions)
    vader = vader_sentiment([PROMPT] * 2, completions)
    assert result.rewards == pytest.approx([0.5 * r + 2.0 * v for r, v in zip(rm, vader)], abs=1e-5)


def test_reward_model_source_of_the_wrong_kind_fails_at_start_up(saved_reward_models):
    with pytest.raises(ValueError, match=r"reward\.sources\[0\]\.path = '.*': '.*' holds a 'scalar' reward model, not 'classifier'"):
        worker({"name": "classifier_rm", "path": saved_reward_models["scalar_rm"][0]})


# --- config -------------------------------------------------------------------


def run_config(reward):
    return RunConfig.model_validate({"model": {"path": "builtin:tiny-llama"}, "reward": reward})


def test_function_alone_is_one_source_of_weight_one():
    sources = RewardConfig(function="heuristic_reply").resolved_sources()
    assert [(s.name, s.weight, s.display_name) for s in sources] == [("heuristic_reply", 1.0, "heuristic_reply")]


def test_function_and_sources_together_are_refused_with_the_fix():
    with pytest.raises(ValidationError, match=r"reward\.function = 'heuristic_reply' and reward\.sources are both set; use one"):
        run_config({"function": "heuristic_reply", "sources": [{"name": "vader_sentiment"}]})


def test_config_with_sources_survives_a_dump_and_reload():
    config = run_config({"sources": [{"name": "vader_sentiment", "weight": 0.5}], "normalize": "running"})
    assert config.reward.function is None
    reloaded = RunConfig.model_validate(config.model_dump(mode="json"))
    assert reloaded.reward == config.reward


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"name": "scalar_rm"}], r"reward\.sources\[name='scalar_rm'\]\.path is required"),
        ([{"name": "vader_sentiment", "path": "."}], r"path = '\.' is only used by reward models"),
        ([{"name": "scalar_rm", "path": ".", "options": {"adapter": "."}}], r"options\.adapter is only for 'seqcls_rm'"),
        ([{"name": "seqcls_rm", "path": ".", "options": {"templat": "{completion}"}}], r"options: \['templat'\] unknown"),
        ([{"name": "scalar_rm", "path": ".", "options": {"template": "{prompt}"}}], r"options\.template = '\{prompt\}' must"),
        ([{"name": "scalar_rm", "path": ".", "options": {"template": "{completion}", "chat_template": False}}],
         r"give 'template' or 'chat_template', not both"),
        ([{"name": "a:f"}, {"name": "b:f"}], r"label 'f' is used by more than one source"),
    ],
)
def test_bad_sources_name_the_field_and_the_fix(sources, message):
    with pytest.raises(ValidationError, match=message):
        run_config({"sources": sources})


# --- several reward actors ----------------------------------------------------


@pytest.mark.slow
def test_reward_pool_splits_samples_across_actors_and_normalises_once(ray_session):
    from raylign.cluster.reward_pool import RewardPool

    config = RewardConfig(
        sources=[{"name": "tests.test_reward_sources:mixed_garbage"}, {"name": "tests.test_reward_sources:length_reward"}],
        normalize="running", ema_momentum=0.5, num_workers=2, num_cpus=0.1, batch_size=4,
    )
    samples = make_samples(["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"])
    pool = RewardPool(config)
    single = RewardWorker(config)
    for _ in range(2):
        expected, got = single.score_batch(samples), pool.score_batch(samples)
        assert got.rewards == pytest.approx(expected.rewards)
        assert got.components == expected.components
        assert [(e["index"], e["error"]) for e in got.errors] == [(e["index"], e["error"]) for e in expected.errors]
    assert pool.state_dict() == pytest.approx(single.normalizer_state())
