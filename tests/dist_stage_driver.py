"""Run under `torchrun --nproc_per_node 2` by test_stages.py: the three generation stages in one launch."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

torch.set_num_threads(1)
import judge  # noqa: E402
import meta_judge  # noqa: E402
import sample  # noqa: E402

ckpt, prompts, work = sys.argv[1:4]
out = lambda name: os.path.join(work, name)  # noqa: E731
sample.main(["--model", ckpt, "--prompts", prompts, "--out", out("responses.jsonl"), "--n-responses", "3",
             "--max-new-tokens", "12", "--temperature", "1.0"])
judge.main(["--model", ckpt, "--responses", out("responses.jsonl"), "--out", out("judgments.jsonl"), "--n-judgments", "2",
            "--max-new-tokens", "8", "--score-mode", "expected", "--pairs", out("actor_pairs.jsonl")])
meta_judge.main(["--model", ckpt, "--judgments", out("judgments.jsonl"), "--out", out("meta.jsonl"),
                 "--pairs", out("judge_pairs.jsonl"), "--max-new-tokens", "6", "--verdict-mode", "expected", "--truncated", "keep"])
