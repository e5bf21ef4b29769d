"""Reward models on the tiny offline Llama: last-token scalar head, sequence classification + LoRA, classifier with soft inputs."""

import pytest
import torch

from raylign.common.reward_models import (
    ClassifierRewardModel,
    ScalarRewardModel,
    SequenceClassificationRewardModel,
    last_token_index,
    load_reward_model,
    mean_pool,
)

TEXTS = ["The movie was great", "bad", "A long, slow film with a wonderful ending and fine acting."]


@pytest.fixture(scope="module")
def scalar_rm(tiny_model_dir):
    torch.manual_seed(0)
    return ScalarRewardModel.from_base(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def classifier_rm(tiny_model_dir):
    torch.manual_seed(0)
    return ClassifierRewardModel.from_base(tiny_model_dir).eval()


def test_last_token_index_finds_the_last_non_pad_token_for_either_padding_side():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 0]


def test_mean_pool_averages_only_non_pad_positions():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_scalar_rm_reads_the_head_on_the_last_non_pad_hidden_state(scalar_rm):
    batch = scalar_rm.tokenize(TEXTS)
    with torch.no_grad():
        rewards = scalar_rm.reward(**batch)
        hidden = scalar_rm.backbone(**batch).last_hidden_state
    lengths = batch["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        expected = scalar_rm.head(hidden[row, length - 1]).item()
        assert rewards[row].item() == pytest.approx(expected, abs=1e-6)
    # Right padding means the rows are padded differently; the pad tokens must not be what is scored.
    assert len(set(lengths.tolist())) == 3


def test_scalar_rm_score_does_not_depend_on_padding_or_batch_company(scalar_rm):
    alone = [scalar_rm.score_texts([text])[0] for text in TEXTS]
    together = scalar_rm.score_texts(TEXTS, batch_size=3)
    one_by_one = scalar_rm.score_texts(TEXTS, batch_size=1)
    assert together == pytest.approx(alone, abs=1e-5)
    assert one_by_one == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in alone)) == 3


def test_scalar_rm_accepts_a_causal_lm_and_uses_its_body(tiny_model_dir, scalar_rm):
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = ScalarRewardModel(causal, scalar_rm.tokenizer)
    model.head.load_state_dict(scalar_rm.head.state_dict())
    assert model.score_texts(TEXTS) == pytest.approx(scalar_rm.score_texts(TEXTS), abs=1e-6)


def test_scalar_rm_save_and_load_give_the_same_scores(scalar_rm, tmp_path):
    scalar_rm.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm", "scalar")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.score_texts(TEXTS) == pytest.approx(scalar_rm.score_texts(TEXTS), abs=1e-6)


def test_loading_a_reward_model_as_the_wrong_kind_names_both_kinds(scalar_rm, tmp_path):
    scalar_rm.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"holds a 'scalar' reward model, not 'classifier'"):
        load_reward_model(tmp_path / "rm", "classifier")
    with pytest.raises(ValueError, match=r"has no reward_model.json"):
        load_reward_model(tmp_path, "scalar")


def test_classifier_soft_path_equals_hard_path_on_exact_one_hots(classifier_rm):
    batch = classifier_rm.tokenize(TEXTS)
    vocab = classifier_rm.backbone.get_input_embeddings().weight.shape[0]
    one_hots = torch.nn.functional.one_hot(batch["input_ids"], vocab).float()
    with torch.no_grad():
        hard = classifier_rm.reward(**batch)
        soft = classifier_rm.reward_from_distributions(one_hots, batch["attention_mask"])
    assert torch.allclose(soft, hard, atol=1e-5, rtol=0)
    assert ((hard > 0) & (hard < 1)).all()


def test_classifier_soft_path_passes_gradients_to_token_probs_not_to_the_frozen_body(classifier_rm):
    batch = classifier_rm.tokenize(TEXTS[:2])
    vocab = classifier_rm.backbone.get_input_embeddings().weight.shape[0]
    torch.manual_seed(1)
    logits = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)
    classifier_rm.reward_from_distributions(logits.softmax(dim=-1), batch["attention_mask"]).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    # Pad positions are masked out of the pooling, so nothing flows into them.
    pad_rows, pad_cols = (batch["attention_mask"] == 0).nonzero(as_tuple=True)
    assert len(pad_rows) > 0 and logits.grad[pad_rows, pad_cols].abs().max() < 1e-9
    assert all(p.grad is None for p in classifier_rm.backbone.parameters())
    assert all(p.grad is not None for p in classifier_rm.head.parameters())
    classifier_rm.zero_grad(set_to_none=True)


def test_classifier_reward_is_p_positive_of_the_mlp_on_the_mean_pooled_body(classifier_rm):
    batch = classifier_rm.tokenize(TEXTS)
    with torch.no_grad():
        pooled = mean_pool(classifier_rm.backbone(**batch).last_hidden_state, batch["attention_mask"])
        expected = classifier_rm.head(pooled).softmax(dim=-1)[:, 1]
        assert torch.allclose(classifier_rm.reward(**batch), expected, atol=1e-6)
    assert classifier_rm.score_texts(TEXTS, batch_size=1) == pytest.approx(expected.tolist(), abs=1e-5)


def test_classifier_body_is_frozen_and_stays_in_eval_mode_while_the_head_trains(classifier_rm):
    classifier_rm.train()
    try:
        assert classifier_rm.head.training and not classifier_rm.backbone.training
        assert not any(p.requires_grad for p in classifier_rm.backbone.parameters())
        assert all(p.requires_grad for p in classifier_rm.head.parameters())
    finally:
        classifier_rm.eval()


def test_classifier_refuses_distributions_over_another_vocabulary(classifier_rm):
    with pytest.raises(ValueError, match=r"token_probs has 7 columns but the reward model's vocabulary has 512"):
        classifier_rm.reward_from_distributions(torch.full((1, 2, 7), 1 / 7), torch.ones(1, 2, dtype=torch.long))


def test_classifier_save_and_load_keep_head_and_dropout(classifier_rm, tmp_path):
    classifier_rm.save_pretrained(tmp_path / "clf")
    loaded = load_reward_model(tmp_path / "clf", "classifier")
    assert loaded.dropout == classifier_rm.dropout
    assert loaded.score_texts(TEXTS) == pytest.approx(classifier_rm.score_texts(TEXTS), abs=1e-6)


def test_seqcls_rm_with_a_lora_adapter_scores_like_the_peft_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base_scores = SequenceClassificationRewardModel(base, tokenizer).score_texts(TEXTS)

    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    expected = SequenceClassificationRewardModel(peft_model, tokenizer).score_texts(TEXTS)
    peft_model.save_pretrained(tmp_path / "adapter")

    loaded = load_reward_model(tmp_path / "base", "seqcls", adapter=tmp_path / "adapter")
    assert loaded.score_texts(TEXTS) == pytest.approx(expected, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(expected, base_scores)) > 1e-3
    assert load_reward_model(tmp_path / "base", "seqcls").score_texts(TEXTS) == pytest.approx(base_scores, abs=1e-5)


def test_seqcls_rm_padding_does_not_change_the_score(tiny_model_dir):
    torch.manual_seed(0)
    model = SequenceClassificationRewardModel.from_pretrained(tiny_model_dir)
    alone = [model.score_texts([text])[0] for text in TEXTS]
    assert model.score_texts(TEXTS, batch_size=3) == pytest.approx(alone, abs=1e-5)


def test_adapter_is_refused_for_kinds_that_cannot_load_one(tmp_path):
    with pytest.raises(ValueError, match=r"only 'seqcls' reward models load a LoRA adapter"):
        load_reward_model(tmp_path, "scalar", adapter=tmp_path)


def test_classifier_forward_gives_logits_for_cross_entropy_training(classifier_rm):
    batch = classifier_rm.tokenize(TEXTS)
    with torch.no_grad():
        logits = classifier_rm(**batch)
        assert logits.shape == (3, 2)
        assert torch.allclose(logits.softmax(-1)[:, 1], classifier_rm.reward(**batch))


def test_prompt_completion_scores_match_the_learners_reward_model_scoring(scalar_rm):
    from raylign.common.preference_data import PreferenceExample
    from raylign.learner.reward_training import score_pairs

    prompts, completions = ["The movie was", "The plot"], ["great fun.", " dragged on and on"]
    scores = scalar_rm.score_prompt_completions(prompts, completions, batch_size=1)
    examples = [PreferenceExample(prompt=p, chosen=c, rejected=c) for p, c in zip(prompts, completions)]
    chosen, _ = score_pairs(scalar_rm, scalar_rm.tokenizer, examples, batch_size=2, max_length=scalar_rm.max_length)
    assert scores == pytest.approx(chosen.tolist(), abs=1e-5)
    # The learner's sequences end in EOS (and join "was" + "great" with a space); plain text scoring does neither.
    assert abs(scores[0] - scalar_rm.score_texts([prompts[0] + completions[0]])[0]) > 1e-4


def test_scalar_rm_trains_with_the_learners_bradley_terry_loop(tiny_model_dir):
    from raylign.common.preference_data import PreferenceExample
    from raylign.learner.reward_training import train_reward_model

    torch.manual_seed(0)
    model = ScalarRewardModel.from_base(tiny_model_dir)
    examples = [PreferenceExample(prompt="The movie was", chosen=" great and wonderful.", rejected=" awful.")] * 2
    history = train_reward_model(model, model.tokenizer, examples, steps=3, batch_size=2, learning_rate=1e-2,
                                 max_length=64, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    chosen, rejected = model.score_prompt_completions(["The movie was"] * 2, [" great and wonderful.", " awful."])
    assert chosen > rejected


def test_classifier_head_trains_with_the_learners_loop_while_the_body_stays_fixed(tiny_model_dir):
    from raylign.common.preference_data import PreferenceExample
    from raylign.learner.reward_training import train_reward_classifier

    torch.manual_seed(0)
    model = ClassifierRewardModel.from_base(tiny_model_dir, dropout=0.0)
    body_before = {name: p.clone() for name, p in model.backbone.named_parameters()}
    examples = [PreferenceExample(prompt="A great and wonderful film.", label=1), PreferenceExample(prompt="Awful, boring.", label=0)] * 2
    history = train_reward_classifier(model, model.tokenizer, examples, steps=6, batch_size=4, learning_rate=1e-2,
                                      max_length=64, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(torch.equal(p, body_before[name]) for name, p in model.backbone.named_parameters())
    positive, negative = model.score_texts(["A great and wonderful film.", "Awful, boring."])
    assert positive > 0.5 > negative
