"""
The report of one iteration of iterate.py (report.md, and training.png where matplotlib is installed): what
each stage did and skipped, chosen vs rejected, position bias, the training curves, checkpoint selection and
the evaluation, read back from the iteration's files and manifest.

    python report.py runs/demo/iter1            # write (again) the report of an iteration folder
"""
import json
import os
import sys

from common import read_jsonl


def _read_if(path):
    return read_jsonl(path, required=()) if os.path.exists(path) and os.path.getsize(path) > 0 else []


def _dist(xs):
    if not xs:
        return "n/a"
    xs = sorted(xs)
    return f"mean {sum(xs) / len(xs):.2f}, median {xs[len(xs) // 2]:.2f}, min {xs[0]:.2f}, max {xs[-1]:.2f}"


def write_report(d, t, manifest):
    """report.md of one iteration: counts, skips, failure rates, chosen vs rejected, position bias, training
    curves (a PNG too where matplotlib is installed), checkpoint selection, evaluation."""
    st = {k: v.get("counts", {}) for k, v in manifest["stages"].items()}
    lines = [f"# Iteration {t} ({'SFT' if t == 0 else manifest.get('method')})", "",
             f"Model in: `{manifest.get('model_in')}`  ", f"Model out: `{manifest.get('model_out')}`", "",
             "## Stages", "", "| stage | seconds | counts |", "|---|---|---|"]
    for name, v in manifest["stages"].items():
        counts = {k: x for k, x in v.get("counts", {}).items() if not isinstance(x, (list, dict)) or k.endswith("skips")}
        lines.append(f"| {name} | {v.get('seconds')} | {json.dumps(counts)} |")
    if "judgments" in st:
        jd, pairs = st["judgments"], _read_if(os.path.join(d, "actor_pairs.jsonl"))
        lines += ["", "## Actor pairs: chosen vs rejected", "",
                  f"{len(pairs)} pairs; skips: {jd.get('actor_pair_skips', {})}; responses cut at their token limit: "
                  f"{jd.get('truncated_responses', 'n/a')} ({jd.get('truncated', 'drop')}); judge parse failures: "
                  f"{jd.get('parse_failures', 'n/a')} (rate {jd.get('parse_failure_rate', 'n/a')}, score mode "
                  f"{jd.get('score_mode', 'n/a')})", "", "| | score | length (chars) |", "|---|---|---|",
                  f"| chosen | {_dist([p['score_chosen'] for p in pairs])} | {_dist([len(p['chosen']) for p in pairs])} |",
                  f"| rejected | {_dist([p['score_rejected'] for p in pairs])} | {_dist([len(p['rejected']) for p in pairs])} |"]
    if "tpo_pairs" in st:
        w = [st["tpo_pairs"].get(f"mean_{s}_words") for s in ("chosen", "rejected")]
        lines += ["", f"TPO pairs: chosen responses {'n/a' if w[0] is None else w[0]} words on average, rejected "
                      f"{'n/a' if w[1] is None else w[1]} (raise --rho while the chosen run longer)"]
    if "meta_judgments" in st:
        m = st["meta_judgments"]
        lines += ["", "## Meta-judge", "",
                  f"{m.get('battles')} battles, unparseable verdicts {m.get('unparseable_rate')}, first-position win rate "
                  f"{m.get('first_position_win_rate')} (omega1 {m.get('omega1')}, omega2 {m.get('omega2')}); "
                  f"{m.get('judge_pairs')} judge pairs, skips {m.get('pair_skips')}"]
    lines += training_section(d, st.get("train", {}), "SFT" if t == 0 else "DPO")
    lines += evaluation_section(st)
    lines += across_iterations(d, t)
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def evaluation_section(st):
    """The evaluation's part of the report: whichever metric the iteration's evaluate stage ran."""
    lines = []
    for je, what in ((st.get("evaluate", {}), ""), (st.get("evaluate_modified", {}), " (y- the answer to a modified request x')")):
        if je.get("metric") != "judge-accuracy":
            continue
        lines += ["", f"## Evaluation: as a judge, this iteration's model (A) vs its starting model (B){what}", "",
                  f"{je['pairs']} held-out labelled pairs, each judged greedily in both orders; position-consistent accuracy "
                  "(right in both orders 1, in one 1/2) with its 95% bootstrap interval", "",
                  "| judge | accuracy | first-shown answer preferred | unparsed verdicts | p(right letter) | p(first-shown letter) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s.upper()} | {je[s]['accuracy']} {je[s]['accuracy_ci95']} | {je[s]['first_position_rate']} | "
                  f"{je[s]['unparsed_rate']} | {je[s].get('p_right', '')} {je[s].get('p_right_ci95', '')} | "
                  f"{je[s].get('p_first', '')} {je[s].get('p_first_ci95', '')} |" for s in ("a", "b") if s in je]
        lines += [""] + [f"A - B {name}: {je[k]}" for k, name in (("accuracy_diff", "accuracy"), ("p_right_diff", "p(right letter)"),
                                                                 ("p_first_diff", "p(first-shown letter)")) if k in je]
    ev = st.get("evaluate", {})
    if ev.get("metric") == "accuracy":
        lines += ["", "## Evaluation: final answers, this iteration's model (A) vs its starting model (B)", "",
                  f"{ev['questions']} held-out questions, {ev['samples']} samples each; 95% bootstrap intervals over "
                  "questions; the parse rate (a readable final answer at all) is format, not correctness", "",
                  f"| model | greedy accuracy | sampled pass@1 | maj@{ev['samples']} | parse rate (greedy / sampled) |",
                  "|---|---|---|---|---|"]
        for side in ("a", "b"):
            r = ev.get(side)
            if r:
                lines.append(f"| {side.upper()} | {r['greedy']} {r['greedy_ci95']} | {r['pass1']} {r['pass1_ci95']} | "
                             f"{r['maj']} {r['maj_ci95']} | {r['greedy_parse_rate']} / {r['sampled_parse_rate']} |")
        if "greedy_diff" in ev:
            lines += ["", f"A - B: greedy {ev['greedy_diff']}, pass@1 {ev['pass1_diff']}, maj {ev['maj_diff']}"]
    if ev.get("metric") == "length":
        lines += ["", "## Evaluation: word limits, this iteration's model (A) vs its starting model (B)", "",
                  f"{ev['prompts']} held-out prompts x limits {ev['limits']} words; violation = more words than the limit; "
                  "intervals are 95% bootstrap intervals over prompts", "",
                  "| model | violations (training wording) | violations (paraphrase) | words / limit | Spearman(limit, words) | words without a limit | empty |",
                  "|---|---|---|---|---|---|---|"]
        for side in ("a", "b"):
            r = ev.get(side)
            if r:
                lines.append(f"| {side.upper()} | {r['instructed']['violation_rate']} {r['instructed']['violation_ci95']} | "
                             f"{r['paraphrased']['violation_rate']} {r['paraphrased']['violation_ci95']} | "
                             f"{r['instructed']['words_over_limit']} | {r['instructed']['spearman_limit_words']} | "
                             f"{r['plain']['mean_words']} | {r['plain']['empty_rate']} |")
        if "instructed_violation_diff" in ev:
            lines += ["", f"A - B violation rate: {ev['instructed_violation_diff']} (training wording), "
                          f"{ev['paraphrased_violation_diff']} (paraphrase)"]
    if ev and "win_rate" in ev:
        lines += ["", "## Evaluation: this iteration's model (A) vs its starting model (B)", "",
                  f"{ev['prompts']} held-out prompts, judge `{ev['judge']}` ({ev['verdict_mode']} verdicts"
                  f"{'; the win rate is soft: the mean of the judge probability that A is better, over both orders' if ev.get('soft') else ''}): "
                  f"wins {ev['wins']}, ties {ev['ties']}, losses {ev['losses']}; win rate {ev['win_rate']} "
                  f"(95% CI {ev['win_rate_ci95']}), length-controlled {ev['lc_win_rate']}; mean length A "
                  f"{ev['mean_chars_a']} vs B {ev['mean_chars_b']} chars; unparseable verdicts {ev['unparseable_verdicts']}"]
    return lines


def _results(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def across_iterations(d, t):
    """The actor and the judge side by side, from the run's first iteration to this one: each iteration's win rate
    against its starting model, and its model's accuracy as a judge of the --judge-eval pairs (the starting
    model's first, as the baseline). A plot too, where matplotlib is installed."""
    run = os.path.dirname(os.path.abspath(d))
    rows = []
    for s in range(0, t + 1):
        ev, je = (_results(os.path.join(run, f"iter{s}", x, "results.json")) for x in ("eval", "judge_eval"))
        if not je:
            continue
        if not rows and "b" in je:
            rows.append(("start (M0)", None, je["b"]))
        rows.append((f"iteration {s}", ev.get("win_rate"), je["a"]))
    if not rows:
        return []
    fmt = lambda v, ci=None: "" if v is None else f"{v} {ci}" if ci else f"{v}"  # noqa: E731
    lines = ["", "## The actor and the judge across iterations", "",
             "Win rate: the iteration's model against its starting model on held-out prompts. Judge accuracy: the model "
             "judging the labelled pairs of --judge-eval in both orders (right in both 1, in one 1/2); p(right letter) is "
             "its probability of the right verdict (expected mode), which moves before the verdicts do.", "",
             "| model | win rate vs its start | judge accuracy | p(right letter) | first-shown answer preferred |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {fmt(wr)} | {fmt(j['accuracy'], j['accuracy_ci95'])} | {fmt(j.get('p_right'), j.get('p_right_ci95'))} "
              f"| {j['first_position_rate']} |" for name, wr, j in rows]
    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 3))
        x = list(range(len(rows)))
        for key, label in (("accuracy", "judge accuracy"), ("p_right", "p(right letter)")):
            ys = [j.get(key) for _, _, j in rows]
            if any(y is not None for y in ys):
                ax.plot(x, ys, marker="o", label=label)
        ax.plot(x, [wr for _, wr, _ in rows], marker="s", label="win rate vs start")
        ax.set_xticks(x, [name for name, _, _ in rows], fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        return fig
    lines += plot(d, "across_iterations.png", "the actor and the judge across iterations", draw)
    return lines


def plot(d, name, caption, draw):
    """`draw(pyplot)` -> a figure, saved as d/name where matplotlib is installed -> the report's lines for it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(os.path.join(d, name))
    plt.close(fig)
    return ["", f"![{caption}]({name})"]


def training_section(d, train, what):
    lines = ["", f"## {what}", ""]
    metrics = _read_if(os.path.join(d, "model.train", "metrics.jsonl"))
    if not metrics:
        return lines + [str(train.get("skipped", "no training metrics"))]
    cols = ["loss", "reward_acc", "margin", "chosen_logps", "rejected_logps", "grad_norm"] if "margin" in metrics[0] \
        else ["loss", "grad_norm"]
    lines += ["| step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {m['step']} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |" for m in metrics]
    if "val_score_by_epoch" in train:
        what = {"winrate": "win rate against the starting model", "accuracy": "greedy accuracy",
                "length": "share of word limits kept", "judge-accuracy": "judge accuracy"}[train["select_metric"]]
        lines += ["", f"Checkpoint selection on held-out prompts ({what}) by epoch: {train['val_score_by_epoch']}; "
                      f"epoch {train['best_epoch']} kept."]
    def draw(plt):
        keys = [c for c in ("loss", "reward_acc", "margin") if c in cols]
        fig, ax = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for a, key in zip(ax[0], keys):
            a.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o")
            a.set_title(key)
            a.set_xlabel("step")
        return fig
    lines += plot(d, "training.png", "training curves", draw)
    return lines


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    write_report(folder, manifest.get("iteration", 0), manifest)
    print(os.path.join(folder, "report.md"))
