"""Writes the measured figures of benchmarks/results/ into README.md and the
documentation pages (docs/*.md).

Each block between `<!-- name -->` and `<!-- /name -->` is rebuilt from the
results file of the same name, so no figure is typed in.

    python -m benchmarks.update_readme      # from the repository root

The paper benchmark's blocks come from benchmarks/results/mnist1d/summary.md
and <model>/results.md, which `python -m benchmarks.paper` writes (and
`python -m benchmarks.paper.report --out benchmarks/results/mnist1d` rebuilds
from the stored runs), and from benchmarks/results/paper_speed/speed.md
(`python -m benchmarks.paper.compare`); the cheaper-SAM blocks from
benchmarks/results/efficient/summary.json (`python -m benchmarks.efficient`) and
benchmarks/results/efficient_ramp/summary.json (the same with `--schedule BC`);
the memory table from benchmarks/results/step_memory_cpu.json
(`benchmarks/step_memory.py`), the fine-tuning table from
benchmarks/results/fine_tuning_cost_cpu.json (`benchmarks/fine_tuning_cost.py`)
and benchmarks/results/lora_study/results.md (`python -m benchmarks.lora_study`),
the cost by the epoch from
benchmarks/results/step_cost_epochs_cpu.json (`step_cost.py --epochs`);
the noise-scale and plateau rules' blocks from the paper benchmark's <model>/runs.json, and
the noise scale estimate's cost from benchmarks/results/noise_scale_cost_cpu.json
(`python benchmarks/step_cost.py --noise-scale --json ...`).
"""

import argparse
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def gpu_step_cost():
    r = json.load(open(os.path.join(RESULTS, "gpu_step_cost_h200.json")))
    rows = [
        "| policy | step | plain img/s | SAM img/s | GSAM img/s | SAM cost / plain "
        "| GSAM cost / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, v in r["policies"].items():
        ips, ratio = v["images_per_second"], v["cost_ratio"]
        rows.append(
            f"| {policy} | Keras `fit` step / keras_sam | {ips['plain']:.0f} | {ips['sam']:.0f} "
            f"| {ips['gsam']:.0f} | {ratio['sam']:.2f} | {ratio['gsam']:.2f} |"
        )
        if "minimal_sam" in ips:
            rows.append(
                f"| {policy} | minimal hand-written (baseline) | {ips['minimal_plain']:.0f} "
                f"| {ips['minimal_sam']:.0f} | | {ratio['minimal_sam']:.2f} | |"
            )
    return (
        "\n".join(rows)
        + f"\n\n({r['device']}, Keras {r['keras']}, JAX {r['jax']}, batch {r['batch']})"
    )


CHEAPER_GPU = (
    # (key in cost_ratio, what the docs call it, its baseline)
    ("sam", "SAM", "plain SGD"),
    ("sam_every5", "SAM every 5", "plain SGD"),
    ("looksam5", "LookSAM every 5", "plain SGD"),
    ("msam", "Momentum-SAM", "plain SGD momentum 0.9"),
    ("mesa", "MESA", "plain SGD"),
)


def gpu_step_cost_cheaper():
    """The cheaper steps' cost on the GPU (`gpu_step_cost.py --cheaper`)."""
    r = json.load(open(os.path.join(RESULTS, "gpu_step_cost_h200.json")))
    policies = [p for p, v in r["policies"].items() if "msam" in v["cost_ratio"]]
    if not policies:
        raise FileNotFoundError(None, None, "gpu_step_cost_h200.json (no --cheaper run)")
    rows = [
        "| step | cost against | " + " | ".join(f"{p} cost / plain" for p in policies) + " |",
        "|---|---|" + "---|" * len(policies),
    ]
    for key, name, baseline in CHEAPER_GPU:
        cells = " | ".join(f"{r['policies'][p]['cost_ratio'][key]:.2f}" for p in policies)
        rows.append(f"| {name} | {baseline} | {cells} |")
    command = (
        "KERAS_BACKEND=jax python benchmarks/gpu_step_cost.py --minimal --cheaper "
        "--policies float32 --json benchmarks/results/gpu_step_cost_h200.json"
    )
    return "\n".join(rows) + _gpu_footer(
        r, f"`{command}`, then `--policies mixed_bfloat16 --merge`"
    )


def _gpu_footer(r, command):
    """The line under a GPU table: its command and card."""
    card = f"{r['device']}, Keras {r['keras']}, JAX {r['jax']}, batch {r['batch']}"
    return f"\n\n(from {command}; {card})"


def gpu_conditional():
    """What the step's conditional alone costs on the GPU (`--conditional`)."""
    r = json.load(open(os.path.join(RESULTS, "gpu_step_cost_conditional_h200.json")))
    rows = ["| policy | SAM cost / plain | the conditional alone, cost / plain |", "|---|---|---|"]
    for policy, v in r["policies"].items():
        ratio = v["cost_ratio"]
        rows.append(f"| {policy} | {ratio['sam']:.2f} | {ratio['conditional']:.2f} |")
    command = (
        "KERAS_BACKEND=jax python benchmarks/gpu_step_cost.py --conditional "
        "--json benchmarks/results/gpu_step_cost_conditional_h200.json"
    )
    return "\n".join(rows) + _gpu_footer(r, f"`{command}`")


def step_cost_cpu():
    r = json.load(open(os.path.join(RESULTS, "step_cost_cpu.json")))
    ms, ratio = r["ms_per_step"], r["ratio"]
    # Older results files name only plain, SAM and GSAM.
    names = r.get("methods", {"plain": "plain", "sam": "SAM", "gsam": "GSAM"})
    keys = [k for k in names if k in ms]
    rows = [
        "| | " + " | ".join(names[k] for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
        "| ms / step | " + " | ".join(f"{ms[k]:.1f}" for k in keys) + " |",
        "| median ratio to plain | "
        + " | ".join("1" if k == "plain" else f"{ratio[k]:.3f}" for k in keys)
        + " |",
    ]
    if "sam_fraction" in r:
        rows.append(
            "| share of SAM steps (measured) | "
            + " | ".join(f"{r['sam_fraction'][k]:.2f}" for k in keys)
            + " |"
        )
    rounds = f", {r['rounds']} rounds of {r['steps_per_round']} steps" if "rounds" in r else ""
    return (
        "\n".join(rows) + f"\n\n({r['machine']}, {r['backend']}, Keras {r['keras']}, "
        f"batch {r['batch']}, {r['image']}x{r['image']}x3, jit={r['jit']}{rounds})"
    )


FIT_CALLS = (
    ("on (NumPy arrays)", "step_cost_fit_calls_cpu.json"),
    ("off", "step_cost_fit_calls_no_autotune_cpu.json"),
)
"""The two `step_cost.py --fit-calls` results: tf.data autotuning on and off."""


def step_cost_fit_calls():
    rows = [
        "| tf.data autotune | method | median ratio to plain | per-process medians | "
        "single calls | calls with a slow teardown | per-process medians without "
        "the teardown |",
        "|---|---|---|---|---|---|---|",
    ]
    first = None
    for mode, name in FIT_CALLS:
        r = json.load(open(os.path.join(RESULTS, name)))
        first = first or r
        for key, v in r["ratio"].items():
            slow = f"{v['calls_with_slow_teardown']} / {v['calls']}"
            if key == "plain":
                rows.append(f"| {mode} | plain | 1 | | | {slow} | |")
                continue
            rows.append(
                f"| {mode} | {r['methods'][key]} | {v['median']:.2f} | "
                f"{min(v['process_medians']):.2f}-{max(v['process_medians']):.2f} | "
                f"{v['calls_min']:.2f}-{v['calls_max']:.2f} | {slow} | "
                f"{min(v['without_teardown_process_medians']):.2f}-"
                f"{max(v['without_teardown_process_medians']):.2f} |"
            )
    r = first
    return (
        "\n".join(rows) + f"\n\n({r['machine']}, {r['backend']}, Keras {r['keras']}, "
        f"batch {r['batch']}, {r['image']}x{r['image']}x3, {r['processes']} fresh "
        f"processes x {r['calls_per_process']} fit calls of {r['steps_per_fit_call']} "
        "steps per method)"
    )


def headline_cost():
    """The front page's cost table: whole epochs of fit (`step_cost.py --epochs`)."""
    r = json.load(open(os.path.join(RESULTS, "step_cost_epochs_cpu.json")))
    rows = ["| method | cost / plain step |", "|---|---|"]
    for key, v in r["ratio"].items():
        rows.append(f"| {r['methods'][key]} | {v:.2f} |")
    return (
        "\n".join(rows) + "\n\n(median of per-epoch ratios, from `python benchmarks/step_cost.py "
        "--epochs`, the full command on the step-cost page; "
        f"{r['machine']}, {r['backend']}, Keras {r['keras']}, a conv net with BatchNorm, "
        f"batch {r['batch']}, {r['image']}x{r['image']}x3, {r['rounds']} epochs of "
        f"{r['fit_steps']} steps per method)"
    )


def efficient_verdicts():
    """The front page's verdict table of the cheaper-SAM benchmark."""
    r = json.load(open(os.path.join(RESULTS, "efficient", "summary.json")))
    return (
        r["verdict_table"]
        + "\n"
        + "\n".join(f"- {line}" for line in r["guidance"][-2:])
        + f"\n\n(`{r['command']}`; {r['machine']}; {r['runs']} runs, "
        f"{r['converged']} converged)"
    )


def efficient(folder="efficient"):
    r = json.load(open(os.path.join(RESULTS, folder, "summary.json")))
    tables = "\n".join(f"{model}:\n\n{text}" for model, text in r["markdown"].items())
    return (
        f"`{r['command']}` ({r['machine']}; {r['versions']['backend']}, "
        f"Keras {r['versions']['keras']}; {r['runs']} runs, {r['converged']} converged; "
        f"the runs took {r['runs_s'] / 60:.1f} min in all). Protocol: {r['protocol']}.\n\n"
        "Verdict, \"keeps >= 90% of SAM's sharpness reduction at <= 1.25x SGD's step "
        'cost without costing accuracy":\n\n'
        + r["verdict_table"]
        + "\n"
        + "\n".join(f"- {line}" for line in r["guidance"])
        + "\n\n![SAM's sharpness reduction kept and test error against cost]"
        f"(benchmarks/results/{folder}/sharpness_vs_cost.png)\n\n" + tables
    )


GUIDE = (
    # (method in benchmarks.efficient, what to write, rows of step_memory.py)
    ("sgd", "the model itself", [("plain", "the step")]),
    ("sam", "`SAMModel(m, rho=0.05)`", [("sam", "the step")]),
    ("gsam", "`GSAMModel(m, rho=0.05, alpha=0.02)`", [("gsam", "the step")]),
    (
        "late25",
        "`SAMModel(m, rho=0.05, sam_start_epoch=E)`, E at 75% of the epochs",
        [("late", "plain step (before the start epoch)"), ("late", "SAM step")],
    ),
    (
        "late50",
        "`SAMModel(m, rho=0.05, sam_start_epoch=E)`, E at half the epochs",
        [("late", "plain step (before the start epoch)"), ("late", "SAM step")],
    ),
    (
        "sam_every5",
        "`SAMModel(m, rho=0.05, sam_every=5)`",
        [("sam_every5", "step between"), ("sam_every5", "SAM step")],
    ),
    (
        "looksam5_alpha0.1",
        "`LookSAMModel(m, rho=0.05, sam_every=5, alpha=0.1)`",
        [("looksam5", "step between"), ("looksam5", "SAM step")],
    ),
    ("aesam", "`AESAMModel(m, rho=0.05, threshold=0.4)`", [("aesam", "the step")]),
    ("msam", "`MSAMModel(m, rho=0.3)` with SGD momentum", [("msam", "the step")]),
    ("mesa", "`MESAModel(m)`", [("mesa", "the step")]),
)


def cheaper_guide():
    """The decision table of the cheaper-SAM page: each option's cost and
    flatness kept (benchmarks.efficient) and memory (step_memory.py)."""
    r = json.load(open(os.path.join(RESULTS, "efficient", "summary.json")))
    memory = json.load(open(os.path.join(RESULTS, "step_memory_cpu.json")))
    size = list(memory["sizes"])[-1]
    mem = {(x["method"], x["kind"]): x for x in memory["sizes"][size]["rows"]}
    models = list(r["tables"])
    by = {m: {row["method"]: row for row in rows} for m, rows in r["tables"].items()}
    names = " / ".join(m.replace("mnist1d_", "") for m in models)
    rows = [
        f"| option | write | step cost / SGD ({names}) | temporary memory / parameter "
        f"| SAM's sharpness reduction kept ({names}) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for method, write, memory_rows in GUIDE:
        if not all(method in by[m] for m in models):
            continue
        first = by[models[0]][method]
        cost = " / ".join(f"{by[m][method]['cost']:.2f}" for m in models)
        kept = " / ".join(
            "—"
            if by[m][method]["fraction_kept"] is None
            else f"{by[m][method]['fraction_kept']:.0%}"
            for m in models
        )
        temp = " then ".join(f"{mem[k]['temp_per_parameter_byte']:.2f}" for k in memory_rows)
        stored = mem[memory_rows[-1]]["stored_per_parameter_byte"]
        if stored >= 0.005:
            temp += f" (+{stored:.2f} stored)"
        words = [by[m][method]["verdict"] for m in models]
        verdict = words[0] if len(set(words)) == 1 else " / ".join(words)
        rows.append(f"| {first['label']} | {write} | {cost} | {temp} | {kept} | {verdict} |")
    return "\n".join(rows) + (
        f"\n\n(cost, flatness and verdicts: `{r['command']}`, {r['machine']}; memory: "
        "`KERAS_BACKEND=jax python benchmarks/step_memory.py`, XLA's temporary bytes per "
        "parameter byte of the compiled step, MLP of four "
        f"Dense({memory['sizes'][size]['width']}), "
        '"then": the steps without and with SAM\'s second gradient)'
    )


def efficient_ramp():
    """The cheaper-SAM benchmark with the batch ramp (`--schedule BC`)."""
    return efficient("efficient_ramp")


def step_memory():
    """Temporary and stored bytes per parameter byte of each compiled step
    (`benchmarks/step_memory.py`)."""
    r = json.load(open(os.path.join(RESULTS, "step_memory_cpu.json")))
    sizes = list(r["sizes"])
    head = " | ".join(f"temp / param, {n}x{r['sizes'][k]['width']}" for k in sizes for n in ("4",))
    rows = [
        f"| method | step | {head} | stored / param | conditional in the step |",
        "|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    keyed = {k: {(x["method"], x["kind"]): x for x in r["sizes"][k]["rows"]} for k in sizes}
    for x in r["sizes"][sizes[0]]["rows"]:
        key = (x["method"], x["kind"])
        cells = " | ".join(f"{keyed[k][key]['temp_per_parameter_byte']:.2f}" for k in sizes)
        rows.append(
            f"| {x['label']} | {x['kind']} | {cells} | {x['stored_per_parameter_byte']:.2f} "
            f"| {'yes' if x['conditional'] else 'no'} |"
        )
    command = (
        "KERAS_BACKEND=jax python benchmarks/step_memory.py "
        "--json benchmarks/results/step_memory_cpu.json"
    )
    return "\n".join(rows) + (
        f"\n\n(from `{command}`; XLA's `memory_analysis()` of the compiled step on "
        f"{r['machine']} ({r['device']}), Keras {r['keras']}, JAX {r['jax']}; an MLP of four "
        f"Dense layers of the width named, SGD, batch {r['batch']}; stored: optimizer slots "
        "and the wrapper's own state beyond the weights)"
    )


def step_cost_epochs():
    """Whole epochs of fit in one process (`step_cost.py --epochs`)."""
    r = json.load(open(os.path.join(RESULTS, "step_cost_epochs_cpu.json")))
    rows = [
        "| method | ms / step | cost / plain (median of rounds) | cost / plain (fastest epochs) |",
        "|---|---|---|---|",
    ]
    for key, ms in r["ms_per_step"].items():
        if key == "plain":
            rows.append(f"| {r['methods'][key]} | {ms:.1f} | 1 | 1 |")
        else:
            rows.append(
                f"| {r['methods'][key]} | {ms:.1f} | {r['ratio'][key]:.3f} "
                f"| {r['ratio_fastest'][key]:.3f} |"
            )
    expected = ""
    if "one_in_five" in r:
        expected = (
            f"\n\nOne SAM step in five at SAM's measured cost would cost "
            f"1 + (SAM - 1) / {r['sam_every']} = {r['one_in_five']:.3f}."
        )
    methods = ",".join(k for k in r["methods"] if k != "plain")
    command = (
        f"python benchmarks/step_cost.py --epochs --methods {methods} "
        f"--rounds {r['rounds']} --json benchmarks/results/step_cost_epochs_cpu.json"
    )
    return (
        "\n".join(rows)
        + expected
        + f"\n\n(from `{command}`; {r['machine']}, {r['backend']}, Keras {r['keras']}, a conv "
        f"net with BatchNorm, batch {r['batch']}, {r['image']}x{r['image']}x3, {r['rounds']} "
        f"epochs of {r['fit_steps']} steps per method, interleaved, after one untimed epoch)"
    )


def from_markdown(name, demote=0):
    """The file's text; `demote` levels added to its markdown headings (a
    report's `# title` becomes a sub-heading of the README's section)."""

    def render():
        text = open(os.path.join(RESULTS, name)).read().strip()
        # A table right after a list item would render as that item's text.
        text = re.sub(r"^([^|\n].*)\n(\|)", r"\1\n\n\2", text, flags=re.M)
        if demote:
            text = re.sub(
                r"^(#+) ", lambda m: "#" * (len(m.group(1)) + demote) + " ", text, flags=re.M
            )
        return text

    return render


def paper_summary():
    """summary.md, its paths (relative to the summary) made relative to the
    repository root."""
    text = from_markdown(os.path.join("mnist1d", "summary.md"))()
    text = re.sub(
        r"`([\w.-]+/results\.md)`", lambda m: f"`benchmarks/results/mnist1d/{m.group(1)}`", text
    )
    # The command and machine, from the header of the first model's report.
    header = from_markdown(os.path.join("mnist1d", "mnist1d_cnn", "results.md"))()
    found = dict(re.findall(r"^- (command|machine): (.*)$", header, re.M))
    return text + f"\n\n(from {found['command']}; {found['machine']})"


GROWN_BATCH_RULES = ("adaptive", "plateau")
"""The claims of the batch-size rules start with these schedule names."""


def paper_summary_short():
    """`paper_summary` without the batch-size rules' claims (the README's
    front page; the batch-size page has them in full)."""
    rows = [
        line
        for line in paper_summary().splitlines()
        if not line.startswith(tuple(f"| {rule} " for rule in GROWN_BATCH_RULES))
    ]
    return "\n".join(rows)


def noise_scale_cost():
    """`step_cost.py --noise-scale`: each method with the estimate against itself without."""
    r = json.load(open(os.path.join(RESULTS, "noise_scale_cost_cpu.json")))
    from_plain = r["ratio"]
    rows = [
        "| method | ms / step without | with the estimate | ratio with / without |",
        "|---|---|---|---|",
    ]
    for key, ratio in r["estimate_ratio"].items():
        base = NOISE_SCALE_PAIRS[key]
        rows.append(
            f"| {r['methods'][base]} | {r['ms_per_step'][base]:.1f} | "
            f"{r['ms_per_step'][key]:.1f} | {ratio:.3f} |"
        )
    plain = ", ".join(f"{r['methods'][k]} {v:.2f}x" for k, v in from_plain.items())
    return (
        "\n".join(rows) + f"\n\n(`python benchmarks/step_cost.py --noise-scale --json "
        f"benchmarks/results/noise_scale_cost_cpu.json`; {r['machine']}, {r['backend']}, "
        f"Keras {r['keras']}, the conv net with BatchNorm, batch {r['batch']}, "
        f"{r['image']}x{r['image']}x3, median of {r['rounds']} interleaved rounds of "
        f"{r['steps_per_round']} steps; against a plain Keras step: {plain})"
    )


NOISE_SCALE_PAIRS = {"plain_noise": "plain_rho0", "sam_noise": "sam", "gsam_noise": "gsam"}
"""As in benchmarks/step_cost.py (not imported: it sets up TensorFlow)."""


def adaptive():
    """The noise-scale rule's claims on both MNIST-1D models
    (`AdaptiveBatchSize`, the schedules adaptive and adaptive_C)."""
    return _grown_batch_claims("adaptive", plots=False)


def plateau():
    """The plateau rule's claims on both MNIST-1D models
    (`BatchSizeOnPlateau`, the schedules plateau and plateau_C), and the
    batch-size / noise-scale plots of both rules beside B."""
    return _grown_batch_claims("plateau", plots=True)


def _grown_batch_claims(rule, plots):
    """The claims of a grown batch (they start with the rule's schedule
    name, benchmarks.paper.verdicts), each comparison with its means and
    interval, from the paper benchmark's <model>/runs.json."""
    lines = [
        "| model | claim | comparison (a vs b) | mean a | mean b | 95% CI of a − b | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    machine = command = None
    models = ("mnist1d_cnn", "mnist1d_mlp")
    for model in models:
        r = json.load(open(os.path.join(RESULTS, "mnist1d", model, "runs.json")))
        machine, command = r["machine"], r["command"]
        for v in r["verdicts"]:
            if not v["claim"].startswith(rule + " "):
                continue
            lines.append(f"| {model} | **{v['claim']}** | | | | | **{v['verdict']}** |")
            for c in v["comparisons"]:
                lines.append(
                    f"| | | {' '.join(c['a'])} vs {' '.join(c['b'])} (n={c['n']}) | "
                    + " | ".join(_adaptive_cells(v["metric"], c))
                    + f" | {c['verdict']} |"
                )
    text = "\n".join(lines) + f"\n\n(from `{command}`; {machine})"
    if plots:
        text += "\n\n" + "\n\n".join(
            f"![batch size and noise scale, {m}](benchmarks/results/mnist1d/{m}/noise_scale.png)"
            for m in models
        )
    return text


def _adaptive_cells(metric, c):
    if metric == "worst_case_sharpness":
        ci = c["ratio_ci"]
        return (
            f"{c['mean_a']:.3g}",
            f"{c['mean_b']:.3g}",
            "—" if ci is None else f"ratio [{ci[0]:.3g}, {ci[1]:.3g}]",
        )
    if metric == "test_error":
        ci = c["ci"]
        return (
            f"{100 * c['mean_a']:.2f}%",
            f"{100 * c['mean_b']:.2f}%",
            "—" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] pp",
        )
    ci = c["ci"]
    return (
        f"{c['mean_a']:.0f}",
        f"{c['mean_b']:.0f}",
        "—" if ci is None else f"[{ci[0]:+.0f}, {ci[1]:+.0f}]",
    )


def fine_tuning_cost():
    """Memory and step time of LoRA fine-tuning per method
    (`benchmarks/fine_tuning_cost.py`)."""
    r = json.load(open(os.path.join(RESULTS, "fine_tuning_cost_cpu.json")))
    sizes = list(r["sizes"])
    rows = [
        "| size | method | trainable MiB | frozen MiB | temp / trainable byte "
        "| temp / frozen byte | stored / trainable byte | time / AdamW-LoRA step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        entry = r["sizes"][size]
        name = f"{size}: {entry['layers']} layers, hidden {entry['hidden']}"
        for x in entry["rows"]:
            frozen = x["temp_per_frozen_byte"]
            rows.append(
                f"| {name} | {x['label']} | {x['trainable_bytes'] / 2**20:.2f} "
                f"| {x['frozen_bytes'] / 2**20:.2f} | {x['temp_per_trainable_byte']:.1f} "
                f"| {'—' if frozen is None else f'{frozen:.2f}'} "
                f"| {x['stored_per_trainable_byte']:.2f} | {x['time_vs_adamw_lora']:.2f} |"
            )
    command = (
        "KERAS_BACKEND=jax python benchmarks/fine_tuning_cost.py "
        "--json benchmarks/results/fine_tuning_cost_cpu.json"
    )
    return "\n".join(rows) + (
        f"\n\n(from `{command}`; XLA's `memory_analysis()` of the compiled step and the "
        f"median of {r.get('repeats', 5)} timed repeats on {r['machine']} ({r['device']}), "
        f"Keras {r['keras']}, JAX {r['jax']}; a Gemma-style causal LM from a small config, "
        f"LoRA rank {r['lora_rank']} on the attention query and value projections, AdamW, "
        f"batch {r['batch']} x {r['sequence_length']} tokens. Temporaries include the "
        'activations, which dominate at these sizes; "full fine-tuning" trains every '
        "weight, so its trainable bytes are the whole model's.)"
    )


def lora_study():
    """The LoRA fine-tuning study (`python -m benchmarks.lora_study`)."""
    text = from_markdown(os.path.join("lora_study", "results.md"), demote=2)()
    return text.replace("](lora_study.png)", "](benchmarks/results/lora_study/lora_study.png)")


BLOCKS = {
    "gpu_step_cost": gpu_step_cost,
    "gpu_step_cost_cheaper": gpu_step_cost_cheaper,
    "gpu_conditional": gpu_conditional,
    "step_cost_cpu": step_cost_cpu,
    "step_cost_fit_calls": step_cost_fit_calls,
    "batch_switch": from_markdown("batch_switch.md", demote=2),
    "paper_verdicts": paper_summary,
    "paper_verdicts_short": paper_summary_short,
    "paper_mnist1d_cnn": from_markdown(
        os.path.join("mnist1d", "mnist1d_cnn", "results.md"), demote=3
    ),
    "paper_mnist1d_mlp": from_markdown(
        os.path.join("mnist1d", "mnist1d_mlp", "results.md"), demote=3
    ),
    "paper_speed": from_markdown(os.path.join("paper_speed", "speed.md")),
    "efficient": efficient,
    "efficient_ramp": efficient_ramp,
    "cheaper_guide": cheaper_guide,
    "step_memory": step_memory,
    "fine_tuning_cost": fine_tuning_cost,
    "lora_study": lora_study,
    "step_cost_epochs": step_cost_epochs,
    "headline_cost": headline_cost,
    "efficient_verdicts": efficient_verdicts,
    "noise_scale_cost": noise_scale_cost,
    "adaptive": adaptive,
    "plateau": plateau,
}

DOCS = os.path.join(ROOT, "docs")


def targets():
    """README.md and the documentation pages: the files whose blocks are filled."""
    pages = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return [os.path.join(ROOT, "README.md")] + pages


def filled(text, log=lambda message: None):
    """`text` with every block rebuilt from the results files."""
    for name, render in BLOCKS.items():
        # The block's old text, if any, between the two marker lines.
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        if not pattern.search(text):
            continue
        try:
            body = render()
        except FileNotFoundError as error:
            log(f"skipped {name}: {error.filename} is missing")
            continue
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
        log(f"updated {name}")
    return text


def fill(path):
    """Rebuilds the blocks of one markdown file."""
    with open(path) as f:
        text = filled(f.read(), log=lambda m: print(f"{os.path.relpath(path, ROOT)}: {m}"))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main():
    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    ).parse_args()  # no options; --help says what it does instead of doing it
    for path in targets():
        fill(path)


if __name__ == "__main__":
    main()
