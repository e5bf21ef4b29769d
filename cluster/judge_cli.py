"""`raylign judge`: LLM-as-judge win rate of one run's test samples against another's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def paired_answers(candidate_file: Path, baseline_file: Path) -> tuple[list[str], list[str], list[str]]:
    """(prompts, candidate answers, baseline answers): the first sample per prompt present in both files."""

    def first_per_prompt(path: Path) -> dict[str, str]:
        answers: dict[str, str] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            answers.setdefault(row["prompt"], row["completion"])
        return answers

    candidate, baseline = first_per_prompt(candidate_file), first_per_prompt(baseline_file)
    prompts = [p for p in candidate if p in baseline]
    if not prompts:
        raise ValueError(f"'{candidate_file}' and '{baseline_file}' share no prompt; judge test samples of the same test split")
    return prompts, [candidate[p] for p in prompts], [baseline[p] for p in prompts]


def judge_main(argv: list[str]) -> int:
    from raylign.actors.judge import judge_win_rate
    from raylign.common.judge_config import JudgeConfig

    parser = argparse.ArgumentParser(prog="raylign judge", description=__doc__)
    parser.add_argument("candidate", type=Path, help="samples JSONL of the candidate (e.g. RUN/test_samples.jsonl)")
    parser.add_argument("baseline", type=Path, help="samples JSONL of the baseline")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint including /v1")
    parser.add_argument("--model", required=True, help="judge model name at that endpoint")
    parser.add_argument("--mode", choices=["chat", "completions"], default="chat", help="chat or plain completions API")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--template-file", type=Path, default=None,
                        help="judge prompt template with {prompt}, {answer_a}, {answer_b} (default: JudgeConfig's)")
    parser.add_argument("--max-pairs", type=int, default=None, help="judge only the first N shared prompts")
    parser.add_argument("--out", type=Path, default=Path("judge.json"), help="JSON file to write")
    args = parser.parse_args(argv)
    prompts, candidate, baseline = paired_answers(args.candidate, args.baseline)
    if args.max_pairs:
        prompts, candidate, baseline = prompts[: args.max_pairs], candidate[: args.max_pairs], baseline[: args.max_pairs]
    template = {"prompt_template": args.template_file.read_text()} if args.template_file else {}
    config = JudgeConfig(base_url=args.base_url, model=args.model, mode=args.mode, api_key_env=args.api_key_env, **template)
    result = judge_win_rate(prompts, candidate, baseline, config)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"win rate {result['win_rate']} (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}) over {result['pairs']} pairs; "
          f"wins {result['wins']}, losses {result['losses']}, ties {result['ties']}, unparseable {result['unparseable_pairs']}")
    return 0
