"""TRL's GRPOTrainer on a `raylign bench train` workload; run as `python -m raylign.cluster.bench_trl SPEC.json`.

Same model, prompts, reward (VADER on the completion), K=4, LoRA r8 all-linear, beta 0.04, weights in the spec's dtype; writes each
optimizer step's wall seconds to OUTPUT_DIR/step_seconds.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from raylign.actors.rewards import vader_sentiment

    spec = json.loads(Path(spec_path).read_text())
    output_dir = Path(spec["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))

    def reward(prompts, completions, **_):
        return vader_sentiment(prompts, completions)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    config = GRPOConfig(
        output_dir=str(output_dir), max_steps=spec["steps"], per_device_train_batch_size=32, num_generations=4,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, beta=0.04, learning_rate=2e-3,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        # The raylign side's model.dtype: the weights load in it; bfloat16 also trains under bf16 autocast.
        bf16=spec["dtype"] == "bfloat16", model_init_kwargs={"dtype": spec["dtype"]},
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=spec["model_path"], reward_funcs=[reward], args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}), callbacks=[timer],
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    (output_dir / "step_seconds.json").write_text(json.dumps(timer.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
