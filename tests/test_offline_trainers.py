import json
import math
import random

import pytest
import torch

from raylign.common.preference_data import PreferenceExample
from raylign.common.prompt_completion import IGNORE_INDEX, collate_prompt_completion, encode_prompt_completion
from raylign.learner import dpo, reward_training, sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIVE = ["great", "wonderful", "brilliant", "excellent", "charming", "lovely", "fantastic", "delightful"]
NEGATIVE = ["bad", "boring", "awful", "terrible", "dull", "stupid", "horrible", "painful"]
SUBJECTS = ["the movie", "this film", "the acting", "the story", "the plot", "the ending", "the cast", "the music"]
OPENERS = ["Honestly,", "Overall,", "In my opinion,", "To be fair,", "By the end,", "I have to say"]


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32),
                               atol=atol, rtol=0)


def sentiment_pairs(n: int, seed: int) -> list[PreferenceExample]:
    """Separable preferences: the chosen completion is praise, the rejected one is criticism."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} was"
        chosen = f"{rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}."
        rejected = f"{rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}."
        pairs.append(PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path)


def lora_model(path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(causal_lm(path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))


class LastTokenRewardModel(torch.nn.Module):
    """Tiny backbone + linear head on the hidden state of the last non-pad token."""

    def __init__(self, path):
        super().__init__()
        from transformers import AutoModel

        torch.manual_seed(0)
        self.backbone = AutoModel.from_pretrained(path)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask * positions).argmax(-1)
        return self.head(hidden[torch.arange(len(input_ids)), last]).squeeze(-1)


class MeanPoolClassifier(torch.nn.Module):
    """The IMDB seed's classifier RM: frozen backbone, mean pool, 2-layer MLP head, class logits."""

    def __init__(self, path):
        super().__init__()
        from transformers import AutoModel

        torch.manual_seed(0)
        self.backbone = AutoModel.from_pretrained(path)
        self.backbone.requires_grad_(False)
        hidden = self.backbone.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


# ----- prompt-masked SFT -----


def test_sft_example_labels_prompt_tokens_with_ignore_index(tokenizer):
    example = sft.build_sft_example(tokenizer, "The movie was", "great fun.", max_length=64)
    prompt_ids = tokenizer("The movie was").input_ids
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example["labels"][len(prompt_ids):] == example["input_ids"][len(prompt_ids):]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == "The movie was great fun."


def test_masked_sft_loss_puts_no_gradient_on_prompt_positions(tiny_model_dir, tokenizer):
    model = causal_lm(tiny_model_dir)
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "Honestly, the story was", "wonderful.", max_length=64)
    batch = collate_prompt_completion([(prompt_ids, completion_ids)], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)
    nll, tokens = sft.masked_nll(logits, batch["labels"])
    (nll / tokens).backward()
    # Position t predicts token t+1: positions before the last prompt token predict prompt tokens.
    grad_norms = logits.grad[0].norm(dim=-1)
    assert torch.all(grad_norms[: len(prompt_ids) - 1] == 0)
    assert torch.all(grad_norms[len(prompt_ids) - 1: -1] > 0)
    assert tokens.item() == len(completion_ids)
    log_probs = logits.detach().log_softmax(-1)[0]
    by_hand = -sum(log_probs[len(prompt_ids) - 1 + i, token] for i, token in enumerate(completion_ids)) / len(completion_ids)
    close(nll.item() / tokens.item(), by_hand)


def test_masked_sft_on_lora_model_lowers_held_out_loss_and_leaves_base_weights(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    train, held_out = sentiment_pairs(64, seed=1), sentiment_pairs(16, seed=2)
    before = sft.sft_eval(model, tokenizer, held_out, batch_size=16, max_length=32)
    history = sft.masked_sft_train(model, tokenizer, train, steps=30, batch_size=16, learning_rate=5e-3,
                                   max_length=32, seed=0, eval_examples=held_out, eval_every=15)
    after = history[-1]
    assert "eval/loss" in history[14] and "eval/loss" not in history[13]
    assert after["eval/loss"] < before["eval/loss"] - 1.0
    close(after["eval/perplexity"], math.exp(after["eval/loss"]), atol=1e-3)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "lora_" not in n)


def test_chat_template_renders_prompt_and_ends_completion_with_end_of_turn(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate the film."}]
    example = sft.build_sft_example(tokenizer, "Rate the film.", " Lovely.", messages=messages, max_length=64)
    prompt_length = example["labels"].count(IGNORE_INDEX)
    prompt_text = tokenizer.decode(example["input_ids"][:prompt_length])
    completion_text = tokenizer.decode(example["input_ids"][prompt_length:])
    assert prompt_text == "<s>system: Be kind.</s><s>user: Rate the film.</s><s>assistant:"
    assert completion_text == " Lovely.</s>"
    with pytest.raises(ValueError, match="chat_template = true.*no chat template.*chat_template=false"):
        sft.build_sft_example(type(tokenizer).from_pretrained(tokenizer.name_or_path), "a", "b", max_length=8, chat_template=True)


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    prompt_ids, completion_ids = encode_prompt_completion(
        tokenizer, "one two three four five six seven eight nine ten", "alpha beta gamma delta epsilon zeta", max_length=10
    )
    full_prompt, full_completion = encode_prompt_completion(
        tokenizer, "one two three four five six seven eight nine ten", "alpha beta gamma delta epsilon zeta"
    )
    assert len(prompt_ids) + len(completion_ids) == 10
    assert prompt_ids == full_prompt[-len(prompt_ids):] and completion_ids == full_completion[: len(completion_ids)]
    assert len(prompt_ids) >= 5


def test_qlora_without_cuda_names_the_field_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model\.quantization = 4bit: .*CUDA GPU.*remove model\.quantization"):
        sft.qlora_quantization_config()


def test_qlora_config_is_4bit_nf4_when_cuda_and_bitsandbytes_are_there(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    config = sft.qlora_quantization_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


# ----- reward-model losses -----


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # gaps 1 and -1: -log σ(1) = log(1 + e^-1) = 0.313262, -log σ(-1) = log(1 + e) = 1.313262
    close(reward_training.bradley_terry_loss(chosen, rejected), (0.313262 + 1.313262) / 2)
    # margin 0.5: log(1 + e^-0.5) = 0.474077, log(1 + e^1.5) = 1.701413
    close(reward_training.bradley_terry_loss(chosen, rejected, margin=0.5), (0.474077 + 1.701413) / 2)
    # per-pair margins [0, 2]: 0.313262 and log(1 + e^3) = 3.048587
    close(reward_training.bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, 2.0])), (0.313262 + 3.048587) / 2)
    # centring: 0.1 * mean((2 + 1)^2, (0 + 1)^2) = 0.1 * 5 = 0.5
    close(reward_training.bradley_terry_loss(chosen, rejected, center_coef=0.1), (0.313262 + 1.313262) / 2 + 0.5)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    reward_training.bradley_terry_loss(chosen, rejected).backward()
    close(chosen.grad, [-0.5])
    close(rejected.grad, [0.5])


def test_pairwise_accuracy_counts_ties_as_mistakes():
    close(reward_training.pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])), 0.5)


def test_classifier_loss_is_cross_entropy():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    # -log softmax: log(1 + e^-2) = 0.126928 and log 2 = 0.693147
    close(reward_training.classifier_loss(logits, labels), (0.126928 + 0.693147) / 2)


def test_tiny_reward_model_separates_praise_from_criticism(tiny_model_dir, tokenizer, tmp_path):
    model = LastTokenRewardModel(tiny_model_dir)
    train, val = sentiment_pairs(96, seed=3), sentiment_pairs(48, seed=4)
    history = reward_training.train_reward_model(model, tokenizer, train, val_examples=val, steps=40, batch_size=16,
                                                 learning_rate=3e-3, max_length=32, seed=0, eval_every=20)
    assert history[-1]["val/accuracy"] > 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    chosen, rejected = reward_training.score_pairs(model, tokenizer, val, batch_size=16, max_length=32)
    close(reward_training.pairwise_accuracy(chosen, rejected), history[-1]["val/accuracy"])


def test_reward_model_mistakes_file_lists_wrong_pairs_worst_first(tmp_path):
    examples = [PreferenceExample(prompt=f"p{i}", chosen=f"c{i}", rejected=f"r{i}") for i in range(4)]
    count = reward_training.write_reward_model_mistakes(tmp_path / "reward_model_mistakes.jsonl", examples,
                                                        [1.0, 0.0, 2.0, -1.0], [0.0, 0.5, 2.0, 3.0])
    rows = [json.loads(line) for line in (tmp_path / "reward_model_mistakes.jsonl").read_text().splitlines()]
    assert count == 3
    assert [r["prompt"] for r in rows] == ["p3", "p1", "p2"]
    assert rows[0] == {"prompt": "p3", "chosen": "c3", "rejected": "r3", "score_chosen": -1.0, "score_rejected": 3.0}


def test_classifier_reward_model_trains_only_its_head(tiny_model_dir, tokenizer):
    rng = random.Random(5)

    def review(label):
        words = POSITIVE if label else NEGATIVE
        return PreferenceExample(prompt="", label=label, extra={
            "text": f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} was {rng.choice(words)} and {rng.choice(words)}."})

    train = [review(i % 2) for i in range(96)]
    val = [review(i % 2) for i in range(48)]
    model = MeanPoolClassifier(tiny_model_dir)
    backbone_before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    history = reward_training.train_reward_classifier(model, tokenizer, train, val_examples=val, steps=120, batch_size=16,
                                                      learning_rate=3e-3, max_length=32, seed=0)
    assert all(torch.equal(p, backbone_before[n]) for n, p in model.backbone.named_parameters())
    assert history[-1]["val/accuracy"] > 0.9


# ----- DPO -----


def test_dpo_sigmoid_loss_and_metrics_match_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-6.0, -6.0]), torch.tensor([-6.0, -5.0])
    # h = (π_c - ref_c) - (π_r - ref_r): pair 1: 1 - 0 = 1, pair 2: -1 - (-1) = 0
    loss, metrics = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    close(loss, (math.log(1 + math.exp(-0.1)) + math.log(2)) / 2)
    close(metrics["rewards/chosen"], (0.1 - 0.1) / 2)
    close(metrics["rewards/rejected"], (0.0 - 0.1) / 2)
    close(metrics["rewards/margins"], (0.1 + 0.0) / 2)
    close(metrics["rewards/accuracies"], 0.5)


def test_ipo_loss_matches_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-6.0, -6.0]), torch.tensor([-6.0, -5.0])
    # (h - 1/(2β))² with β = 0.1: (1 - 5)² = 16, (0 - 5)² = 25
    loss, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="ipo")
    close(loss, 20.5)
    with pytest.raises(ValueError, match="loss_type = 'hinge'.*sigmoid.*ipo"):
        dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type="hinge")


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    policy_chosen = torch.tensor([-4.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo.dpo_loss(policy_chosen, policy_rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)
    loss.backward()
    # d/dπ_c of -log σ(β h) at h = 0 is -β σ(0) = -0.05
    close(policy_chosen.grad, [-0.05])
    close(policy_rejected.grad, [0.05])


def test_sequence_logprobs_are_the_same_padded_or_alone(tiny_model_dir, tokenizer):
    model = causal_lm(tiny_model_dir)
    short = encode_prompt_completion(tokenizer, "The plot was", "dull.")
    long = encode_prompt_completion(tokenizer, "In my opinion, the music by the end was", "brilliant and lovely, a joy.")
    batch = collate_prompt_completion([short, long], tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = dpo.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    alone = dpo.completion_logprob(model, tokenizer, "The plot was", "dull.")
    close(logps[0], alone, atol=1e-4)
    assert counts.tolist() == [len(short[1]), len(long[1])]


def test_dpo_raises_the_chosen_margin_of_a_lora_model_with_reference_scored_once(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)
    calls = {"disable_adapter": 0}
    disable_adapter = model.disable_adapter

    def counted_disable_adapter():
        calls["disable_adapter"] += 1
        return disable_adapter()

    model.disable_adapter = counted_disable_adapter
    train, val = sentiment_pairs(64, seed=6), sentiment_pairs(32, seed=7)
    history = dpo.dpo_train(model, tokenizer, train, val_examples=val, steps=30, batch_size=16, learning_rate=5e-3,
                            max_length=32, seed=0, beta=0.1)
    assert calls["disable_adapter"] == 1
    # Before any update the policy is the reference: the loss is exactly log 2 and the margin 0.
    close(history[0]["loss"], math.log(2), atol=1e-5)
    close(history[0]["rewards/margins"], 0.0, atol=1e-5)
    assert history[-1]["eval/rewards/margins"] > 0.5
    assert history[-1]["eval/rewards/accuracies"] > 0.9
    assert history[-1]["eval/loss"] < math.log(2) - 0.2


def test_dpo_without_adapter_or_reference_names_the_fix(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="adapter disabled.*get_peft_model.*reference_model="):
        dpo.dpo_train(causal_lm(tiny_model_dir), tokenizer, sentiment_pairs(4, seed=0), steps=1, batch_size=2,
                      learning_rate=1e-3, max_length=32, seed=0)


def test_ipo_training_starts_at_its_target_squared_and_descends(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)
    history = dpo.dpo_train(model, tokenizer, sentiment_pairs(32, seed=8), steps=15, batch_size=16, learning_rate=5e-3,
                            max_length=32, seed=0, beta=0.1, loss_type="ipo")
    # h = 0 before any update, so the loss is (0 - 1/(2·0.1))² = 25.
    close(history[0]["loss"], 25.0, atol=1e-4)
    assert history[-1]["loss"] < 20.0 and history[-1]["rewards/margins"] > 0
