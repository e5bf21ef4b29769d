"""GRADE and GRADE-STE: reward gradients backpropagated through a relaxed generation.

The learner calls these components in one step:

    tau = tau_at(step, tau_start, tau_end, anneal_steps)
    out = relaxed_generate(policy, None, prompt_ids, prompt_mask, max_new_tokens=48, tau=tau,
                           straight_through=ste, eos_token_id=eos)
    probs, mask = out.sequence_for_reward()
    loss, stats = grade_loss(reward_model.reward_from_distributions(probs, mask), out.kl, out.completion_mask,
                             beta, tau=tau)
    loss.backward()

Generation feeds the expected embedding `y @ E` of each relaxed token to the next
step, so the reward's gradient reaches the adapter through every generated token.
The KL to the reference is exact (summed over the vocabulary) and taken on the
same context for both models: at step t the policy and the reference each read the
prompt and the relaxed tokens y_0..y_{t-1}, and their next-token distributions are
compared. Because the context itself depends on the policy, the KL's gradient also
flows through the reference's inputs (its weights stay frozen).

Also here: gradient variance across independent batches at fixed weights (for any
method), steps-to-threshold for sample efficiency, and peak memory for reports.
"""

from __future__ import annotations

import hashlib
import json
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raylign.learner import algorithms as alg

# ----- the relaxation -----


def gumbel_noise(shape: Sequence[int], *, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise g = -log(E), E ~ Exp(1) (as torch's own gumbel_softmax draws it).

    Drawn on the generator's device and moved to `device`, so a CPU generator seeds GPU runs too."""
    source = generator.device if generator is not None else device
    noise = -torch.empty(tuple(shape), device=source, dtype=dtype).exponential_(generator=generator).log()
    return noise.to(device) if device is not None else noise


class RowNoise:
    """Gumbel noise drawn per row: row r's noise at step t comes from a generator seeded by (key, r, t) alone
    (`key`: ints and strings, e.g. ("train", seed, step); hashed by value, so every process draws the same).

    `rows` are the rows' indices in the whole batch, so a row is relaxed with the same noise whichever rows
    share its batch: data-parallel ranks, each relaxing its share of the prompts, together draw exactly the
    noise one learner draws for all of them; and a second pass over the same rows (the backprop window's)
    draws it again. Each step's noise is drawn when the step runs, never [B, T, V] at once."""

    def __init__(self, key: Sequence[int | str], rows: Sequence[int], steps: int, vocab: int, device=None):
        self.key, self.rows, self.device = tuple(key), [int(r) for r in rows], device
        self.shape = (len(self.rows), steps, vocab)

    def at(self, step: int) -> Tensor:
        """The noise of step `step`, [rows, vocab]."""
        return torch.stack([gumbel_noise((self.shape[2],), generator=torch.Generator().manual_seed(self._seed(row, step)))
                            for row in self.rows]).to(self.device)

    def _seed(self, row: int, step: int) -> int:
        digest = hashlib.blake2b(repr((*self.key, row, step)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def restrict_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Logits outside each row's top-k set to -inf (ties with the k-th value are kept)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    if top_k < 1:
        raise ValueError(f"top_k = {top_k}: give a positive number of tokens to keep, or None for the full vocabulary")
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def gumbel_softmax_sample(
    logits: Tensor,
    tau: float,
    noise: Tensor | None = None,
    straight_through: bool = False,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Relaxed sample of categorical(softmax(logits)) over the last dimension: (y, y_soft, y_hard).

    y_soft = softmax((logits + g) / tau) with Gumbel noise g (`noise`, or drawn with `generator`);
    y_hard = one_hot(argmax(logits + g)), an exact sample of the (top-k restricted) distribution.
    y = y_soft, or with `straight_through` the STE y = (y_hard - y_soft).detach() + y_soft:
    the hard one-hot in the forward pass and the soft gradient in the backward pass.
    """
    if tau <= 0:
        raise ValueError(f"tau = {tau}: the relaxation temperature must be > 0")
    logits = restrict_top_k(logits.float(), top_k)
    if noise is None:
        noise = gumbel_noise(logits.shape, generator=generator, device=logits.device)
    perturbed = logits + noise.to(logits)
    y_soft = torch.softmax(perturbed / tau, dim=-1)
    y_hard = F.one_hot(perturbed.argmax(dim=-1), logits.shape[-1]).to(y_soft.dtype)
    y = (y_hard - y_soft).detach() + y_soft if straight_through else y_soft
    return y, y_soft, y_hard


def tau_at(step: int, tau_start: float = 2.0, tau_end: float = 0.5, anneal_steps: int = 1000) -> float:
    """Linear anneal from `tau_start` at step 0 to `tau_end` at `anneal_steps`, constant after."""
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError(f"tau_start = {tau_start}, tau_end = {tau_end}: both temperatures must be > 0")
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(tau_end)
    return float(tau_start + (tau_end - tau_start) * max(step, 0) / anneal_steps)


def exact_kl(policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, p = softmax(policy_logits).

    Tokens both models rule out (-inf logits, e.g. EOS before min_new_tokens) contribute 0, and
    no NaN reaches the backward pass through them.
    """
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.float(), dim=-1)
    p = logp.exp()
    difference = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * difference).sum(dim=-1)


# ----- relaxed generation -----


@dataclass(frozen=True)
class Reference:
    """The frozen reference policy: a model, and the context its forward passes run in.

    `adapter_disabled(peft_model)` is the policy's own base weights (PEFT's `disable_adapter()`);
    `Reference(model)` is a separate frozen model.
    """

    model: nn.Module
    context: Callable[[], AbstractContextManager] = nullcontext

    @classmethod
    def adapter_disabled(cls, peft_model: nn.Module) -> "Reference":
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(
                f"reference = None needs a PEFT policy (one with disable_adapter()), got {type(peft_model).__name__}; "
                "attach a LoRA adapter with peft.get_peft_model, or pass the frozen reference model explicitly"
            )
        return cls(peft_model, peft_model.disable_adapter)


@dataclass
class RelaxedGeneration:
    """What `relaxed_generate` returns; T <= max_new_tokens (it stops once every row has ended)."""

    token_probs: Tensor  # [B, T, V] relaxed tokens y fed to the next step and to the reward model
    tokens: Tensor  # [B, T] hard tokens argmax(logits + g): the sample the relaxation stands for
    completion_mask: Tensor  # [B, T] 1 up to and including each row's first EOS, 0 after
    kl: Tensor  # [B, T] exact KL(policy || reference) of the next-token distributions on the same context
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]

    def sequence_for_reward(self, include_prompt: bool = True, eos_token_id: int | None = None) -> tuple[Tensor, Tensor]:
        """(token_probs [B, L, V], attention_mask [B, L]) right-padded, the layout `RewardModel` batches use:
        prompt one-hots (when `include_prompt`) then the relaxed completion, each row moved to start at
        position 0, so a reward model sees the same positions as when it scores the hard text.

        With `eos_token_id`, a completion's closing EOS is left out, as it is from the hard text the
        reported reward scores (decoded without special tokens): the soft reward pools over the same tokens."""
        completion_mask = self.completion_mask
        if eos_token_id is not None:
            completion_mask = completion_mask * (self.tokens != eos_token_id).to(completion_mask.dtype)
        if not include_prompt:
            probs, mask = self.token_probs, completion_mask
        else:
            prompt = F.one_hot(self.prompt_ids, self.token_probs.shape[-1]).to(self.token_probs.dtype)
            probs = torch.cat([prompt, self.token_probs], dim=1)
            mask = torch.cat([self.prompt_mask.to(completion_mask.dtype), completion_mask], dim=1)
        order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(-1)
        return probs[rows, order], mask[rows, order]


def soft_embed(embedding: nn.Module, token_probs: Tensor) -> Tensor:
    """Expected input embedding [B, T, H] of token distributions [B, T, V]."""
    soft = token_probs.to(embedding.weight.dtype) @ embedding.weight
    # Some bodies (Gemma 3) scale inside the embedding module, which a plain matmul would skip.
    scale = getattr(embedding, "embed_scale", None)
    return soft if scale is None else soft * scale


def _forward_step(model, context, inputs_embeds, attention_mask, position_ids, past_keys, past_values):
    """One forward over `inputs_embeds` [B, n, H] after the cached K/V slices; returns the last position's
    logits [B, V] and this call's K/V slices per layer.

    The cache is rebuilt from per-step slices on every call instead of being grown in place: the function
    is then pure, which per-step checkpointing needs (its backward re-runs it), and a checkpointed step
    holds only its own slices rather than a copy of the whole prefix (without checkpointing, attention
    saves the concatenated prefix at every step, so activation memory grows with T^2).
    """
    from transformers import DynamicCache

    cache = DynamicCache([(torch.cat(k, dim=-2), torch.cat(v, dim=-2)) for k, v in zip(past_keys, past_values)]
                         if past_keys else None)
    with context():
        output = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
    n = inputs_embeds.shape[1]
    keys = tuple(layer.keys[..., -n:, :].clone() for layer in cache.layers)
    values = tuple(layer.values[..., -n:, :].clone() for layer in cache.layers)
    return output.logits[:, -1].float(), keys, values


class _CachedModel:
    """A model plus the K/V slices of every position it has read so far."""

    def __init__(self, model: nn.Module, context: Callable[[], AbstractContextManager], checkpointed: bool):
        if getattr(model, "is_gradient_checkpointing", False) and model.training:
            raise ValueError(
                "the model has transformers' gradient checkpointing enabled, which drops the KV cache relaxed "
                "generation reads; call model.gradient_checkpointing_disable() and pass "
                "gradient_checkpointing=True to relaxed_generate (it checkpoints each generation step)"
            )
        self.model, self.context, self.checkpointed = model, context, checkpointed
        self.keys: list[list[Tensor]] = []
        self.values: list[list[Tensor]] = []

    def step(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
             grad_rows: Tensor | None = None) -> Tensor:
        """Logits of the next token; with `grad_rows` [B] bool, the other rows' logits and K/V slices are
        constants (outside their backprop window)."""
        # Tuples: a checkpointed step is re-run in backward and must see the prefix it saw in forward.
        past_keys = tuple(tuple(k) for k in self.keys)
        past_values = tuple(tuple(v) for v in self.values)
        args = (self.model, self.context, inputs_embeds, attention_mask, position_ids, past_keys, past_values)
        if self.checkpointed and torch.is_grad_enabled():
            logits, keys, values = checkpoint(_forward_step, *args, use_reentrant=False)
        else:
            logits, keys, values = _forward_step(*args)
        if grad_rows is not None and torch.is_grad_enabled():
            logits = _keep_grad_in_rows(logits, grad_rows)
            keys = tuple(_keep_grad_in_rows(k, grad_rows) for k in keys)
            values = tuple(_keep_grad_in_rows(v, grad_rows) for v in values)
        if not self.keys:
            self.keys, self.values = [[] for _ in keys], [[] for _ in values]
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys[layer].append(k)
            self.values[layer].append(v)
        return logits


def _keep_grad_in_rows(x: Tensor, rows: Tensor) -> Tensor:
    """`x` [B, ...] with the gradient cut in every row where `rows` [B] is False."""
    keep = rows.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, x.detach())


def relaxed_generate(
    policy: nn.Module,
    reference: Reference | nn.Module | None,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    tau: float,
    straight_through: bool = False,
    top_k: int | None = None,
    backprop_window: int | None = None,
    gradient_checkpointing: bool = False,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    noise: Tensor | RowNoise | None = None,
) -> RelaxedGeneration:
    """Autoregressive Gumbel-softmax generation from left-padded prompts, differentiable w.r.t. the policy.

    At step t the policy's next-token logits (EOS masked before `min_new_tokens`, as the rollout
    engines do) give y_t = gumbel_softmax_sample(logits, tau, straight_through, top_k), and the next
    input embedding is y_t @ E with E the policy's input embedding matrix. Both models run with a KV
    cache that keeps its autograd graph, so one token costs one forward.

    - `reference`: None = the policy with its PEFT adapter disabled; a `Reference`; or a frozen model,
      which embeds the same relaxed tokens with its own embedding matrix.
    - KL: exact per-token KL(policy || reference) over the full vocabulary at temperature 1 (top-k only
      restricts the relaxed sample, not the distributions compared).
    - `backprop_window` W: only the last W tokens each row actually generated (its EOS included) carry
      gradient; everything before a row's window (its prompt too, when the row is longer than W) is a
      constant. The rows' lengths come from a first pass without autograd under the same noise, so a
      window costs that extra forward but no activation memory before the earliest window, and no row
      that ends early is left without gradient.
    - `gradient_checkpointing`: each step's forward (policy and reference) runs under
      `torch.utils.checkpoint` and is recomputed in backward, so memory holds the K/V slices and logits
      per step instead of every layer's activations. transformers' own `gradient_checkpointing_enable()`
      is refused: it turns the cache off, which this loop needs.
    - `noise` [B, max_new_tokens, V]: Gumbel noise to use instead of drawing it with `generator`, or a
      `RowNoise` that draws each row's.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: generate at least one token")
    if backprop_window is not None and backprop_window < 1:
        raise ValueError(f"backprop_window = {backprop_window}: give a positive number of steps, or None for all")
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} differ in shape")
    if reference is None:
        reference = Reference.adapter_disabled(policy)
    elif not isinstance(reference, Reference):
        reference = Reference(reference)
    options = dict(max_new_tokens=max_new_tokens, tau=tau, straight_through=straight_through, top_k=top_k,
                   gradient_checkpointing=gradient_checkpointing, eos_token_id=eos_token_id,
                   min_new_tokens=min_new_tokens, noise=noise)
    if backprop_window is None or not torch.is_grad_enabled():
        return _relaxed_generate(policy, reference, prompt_ids, prompt_mask, generator=generator, window_starts=None,
                                 **options)
    if noise is None:
        # The second pass must draw the first pass's noise: replay one generator from the same state.
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
        state = generator.get_state()
    with torch.no_grad():
        dry_run = _relaxed_generate(policy, reference, prompt_ids, prompt_mask, generator=generator,
                                    window_starts=None, **options)
    if noise is None:
        generator.set_state(state)
    lengths = dry_run.completion_mask.sum(-1).long()
    window_starts = (lengths - backprop_window).clamp_min(0)
    return _relaxed_generate(policy, reference, prompt_ids, prompt_mask, generator=generator,
                             window_starts=window_starts, **options)


def _relaxed_generate(policy, reference: Reference, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                      tau: float, straight_through: bool, top_k: int | None, gradient_checkpointing: bool,
                      eos_token_id: int | None, min_new_tokens: int, generator: torch.Generator | None,
                      noise: Tensor | RowNoise | None, window_starts: Tensor | None) -> RelaxedGeneration:
    """The generation loop of `relaxed_generate`; `window_starts` [B]: the first step of each row that
    carries gradient (None: every step)."""
    policy_embedding = policy.get_input_embeddings()
    reference_embedding = reference.model.get_input_embeddings()
    shared_embedding = reference_embedding.weight is policy_embedding.weight
    vocab = policy_embedding.weight.shape[0]
    batch = prompt_ids.shape[0]
    if noise is not None and (noise.shape[0] != batch or noise.shape[1] < max_new_tokens or noise.shape[2] != vocab):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; it needs [{batch}, {max_new_tokens}, {vocab}]")

    policy_cache = _CachedModel(policy, nullcontext, gradient_checkpointing)
    reference_cache = _CachedModel(reference.model, reference.context, gradient_checkpointing)
    attention = prompt_mask.long()
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    next_position = attention.sum(-1, keepdim=True)
    grad_wanted = torch.is_grad_enabled()
    first_grad_step = 0 if window_starts is None else int(window_starts.min())
    policy_inputs = policy_embedding(prompt_ids)
    reference_inputs = policy_inputs if shared_embedding else reference_embedding(prompt_ids)

    ys, tokens, masks, kls = [], [], [], []
    alive = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
    for t in range(max_new_tokens):
        with torch.set_grad_enabled(grad_wanted and t >= first_grad_step):
            if t > 0:
                policy_inputs = soft_embed(policy_embedding, ys[-1])
                reference_inputs = policy_inputs if shared_embedding else soft_embed(reference_embedding, ys[-1])
            grad_rows = None if window_starts is None else window_starts <= t
            logits = policy_cache.step(policy_inputs, attention, position_ids, grad_rows)
            reference_logits = reference_cache.step(reference_inputs, attention, position_ids, grad_rows)
            if eos_token_id is not None and t < min_new_tokens:
                logits = logits.index_fill(-1, torch.tensor([eos_token_id], device=logits.device), float("-inf"))
                reference_logits = reference_logits.index_fill(
                    -1, torch.tensor([eos_token_id], device=logits.device), float("-inf"))
            kls.append(exact_kl(logits, reference_logits))
            y, _, y_hard = gumbel_softmax_sample(
                logits, tau, noise=_noise_at(noise, t), straight_through=straight_through,
                top_k=top_k, generator=generator,
            )
        ys.append(y.unsqueeze(1))
        token = y_hard.argmax(-1)
        tokens.append(token)
        masks.append(alive.float())
        if eos_token_id is not None:
            alive = alive & (token != eos_token_id)
            if not alive.any():
                break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        position_ids = next_position + t
    return RelaxedGeneration(
        token_probs=torch.cat(ys, dim=1),
        tokens=torch.stack(tokens, dim=1),
        completion_mask=torch.stack(masks, dim=1),
        kl=torch.stack(kls, dim=1),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
    )


def _noise_at(noise: Tensor | RowNoise | None, step: int) -> Tensor | None:
    if noise is None:
        return None
    return noise.at(step) if isinstance(noise, RowNoise) else noise[:, step]


# ----- the loss -----


def grade_loss(
    reward: Tensor,
    kl: Tensor,
    mask: Tensor,
    beta: float,
    *,
    aggregation: str = "token_mean",
    max_new_tokens: int | None = None,
    tau: float | None = None,
    normaliser: alg.Normaliser | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """loss = -mean(reward) + beta * KL, with the per-token KL [B, T] reduced over `mask` by
    `algorithms.aggregate_loss` ("token_mean" by default; "constant" with max_new_tokens=1 gives the
    per-sequence sum averaged over the batch). `reward` [B] is the soft reward the gradient follows.

    With `normaliser` (the whole batch's counts, when these rows are one rank's share of it) every mean is a
    sum over these rows divided by the batch's count, so the loss and the stats in SHARE_STATS of the ranks
    add up to the batch's."""
    normaliser = normaliser or alg.Normaliser.of(mask)
    sequences = max(normaliser.sequences, 1)
    kl_term = alg.aggregate_loss(kl, mask, aggregation, constant=max_new_tokens, normaliser=normaliser)
    loss = -reward.sum() / sequences + beta * kl_term
    stats = {
        "loss": float(loss.detach()),
        "reward_soft": float(reward.detach().sum()) / sequences,
        "kl": float(alg.masked_sum(kl.detach(), mask)) / max(normaliser.tokens, 1.0),
        "kl_sequence": float(alg.masked_sum(kl.detach(), mask)) / sequences,
        "kl_coef": float(beta),
    }
    if tau is not None:
        stats["tau"] = float(tau)
    return loss, stats


SHARE_STATS = ("loss", "reward_soft", "kl", "kl_sequence")
"""The stats of `grade_loss` that are shares of the batch's (summed over data-parallel ranks)."""


# ----- measurement -----


def gradient_variance(grad_fn: Callable[[int], object], num_batches: int, parameters) -> dict[str, float | int | None]:
    """Spread of a gradient estimator at fixed weights, for any method.

    `grad_fn(i)` computes the loss on independent batch i and calls backward; the `.grad` of `parameters`
    is read (missing grads count as 0) and cleared before each batch, and the caller's grads are put back
    at the end. Over the flattened gradients g_1..g_n (n = num_batches):

    - trace_covariance: sum over coordinates of the unbiased variance across batches, tr Cov[g];
    - mean_grad_norm / grad_norm_std: mean and population std of ||g_i||;
    - mean_gradient_sq_norm: ||mean g||^2, and its unbiased estimate of ||E g||^2,
      mean_gradient_sq_norm_unbiased = ||mean g||^2 - tr Cov / n;
    - variance_ratio: tr Cov / ||mean g||^2, scale-free, so methods with different loss scales compare
      (None when the mean gradient is exactly zero).
    """
    parameters = list(parameters)
    if num_batches < 2:
        raise ValueError(f"num_batches = {num_batches}: a variance needs at least 2 independent batches")
    saved = [p.grad for p in parameters]
    mean = m2 = None
    norms = []
    try:
        for index in range(num_batches):
            for p in parameters:
                p.grad = None
            grad_fn(index)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                              for p in parameters])
            norms.append(float(flat.norm()))
            # Welford's update: stable where sum(g^2) - n * mean^2 would cancel.
            if mean is None:
                mean, m2 = flat.clone(), torch.zeros_like(flat)
            else:
                delta = flat - mean
                mean += delta / (index + 1)
                m2 += delta * (flat - mean)
    finally:
        for p, grad in zip(parameters, saved):
            p.grad = grad
    trace = float(m2.sum() / (num_batches - 1))
    mean_sq = float(mean.dot(mean))
    return {
        "num_batches": num_batches,
        "num_parameters": int(mean.numel()),
        "trace_covariance": trace,
        "mean_grad_norm": statistics.fmean(norms),
        "grad_norm_std": statistics.pstdev(norms),
        "mean_gradient_sq_norm": mean_sq,
        "mean_gradient_sq_norm_unbiased": mean_sq - trace / num_batches,
        "variance_ratio": trace / mean_sq if mean_sq > 0 else None,
    }


def write_gradient_variance(path: str | Path, result: dict) -> Path:
    """Write a `gradient_variance` result (plus whatever the caller added: method, step) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False))
    return path


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process: CUDA's max_memory_allocated on a GPU device, else the peak resident
    set size (ru_maxrss; KiB on Linux, bytes on macOS). Reset the CUDA peak with
    torch.cuda.reset_peak_memory_stats() to measure one phase; the RSS peak cannot be reset."""
    device = torch.device(device) if device is not None else None
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if on_gpu:
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)

