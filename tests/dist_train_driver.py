"""Run under `torchrun --nproc_per_node 2` by test_train_dpo.py: four trainings in one launch (a launch
costs seconds): a full DPO run, a run stopped after 2 steps, its resume, and an SFT run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

torch.set_num_threads(1)
import train_dpo  # noqa: E402

ckpt, pairs, work, sft = sys.argv[1:5]
common = ["--model", ckpt, "--pairs", pairs, "--lr", "1e-3", "--epochs", "2", "--batch-size", "4",
          "--micro-batch-size", "1", "--warmup-steps", "1"]
train_dpo.main(common + ["--out", os.path.join(work, "dist_full")])
train_dpo.main(common + ["--out", os.path.join(work, "dist_resume"), "--stop-after", "2"])
train_dpo.main(common + ["--out", os.path.join(work, "dist_resume"), "--resume"])
train_dpo.main(["--model", ckpt, "--objective", "sft", "--data", sft, "--lr", "1e-3", "--epochs", "2", "--batch-size", "4",
                "--micro-batch-size", "1", "--warmup-steps", "1", "--out", os.path.join(work, "dist_sft")])
