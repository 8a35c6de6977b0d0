"""Writes the measured figures of benchmarks/results/ into README.md.

Each block of the README between `<!-- name -->` and `<!-- /name -->` is
rebuilt from the results file of the same name, so no figure is typed in.

    python benchmarks/update_readme.py
"""

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def gpu_step_cost():
    r = json.load(open(os.path.join(RESULTS, "gpu_step_cost_h200.json")))
    rows = ["| policy | step | plain img/s | SAM img/s | GSAM img/s | SAM cost / plain | GSAM cost / plain |",
            "|---|---|---|---|---|---|---|"]
    for policy, v in r["policies"].items():
        ips, ratio = v["images_per_second"], v["cost_ratio"]
        rows.append(f"| {policy} | Keras `fit` step / keras_sam | {ips['plain']:.0f} | {ips['sam']:.0f} "
                    f"| {ips['gsam']:.0f} | {ratio['sam']:.2f} | {ratio['gsam']:.2f} |")
        if "minimal_sam" in ips:
            rows.append(f"| {policy} | minimal hand-written (baseline) | {ips['minimal_plain']:.0f} "
                        f"| {ips['minimal_sam']:.0f} | | {ratio['minimal_sam']:.2f} | |")
    return "\n".join(rows) + f"\n\n({r['device']}, Keras {r['keras']}, JAX {r['jax']}, batch {r['batch']})"


def step_cost_cpu():
    r = json.load(open(os.path.join(RESULTS, "step_cost_cpu.json")))
    ms, ratio = r["ms_per_step"], r["ratio"]
    return (f"| | plain | SAM | GSAM |\n|---|---|---|---|\n"
            f"| ms / step | {ms['plain']:.1f} | {ms['sam']:.1f} | {ms['gsam']:.1f} |\n"
            f"| median ratio to plain | 1 | {ratio['sam']:.3f} | {ratio['gsam']:.3f} |\n\n"
            f"({r['machine']}, {r['backend']}, Keras {r['keras']}, batch {r['batch']}, "
            f"{r['image']}x{r['image']}x3, jit={r['jit']})")


def from_markdown(name):
    def render():
        return open(os.path.join(RESULTS, name)).read().strip()
    return render


BLOCKS = {
    "gpu_step_cost": gpu_step_cost,
    "step_cost_cpu": step_cost_cpu,
    "batch_switch": from_markdown("batch_switch.md"),
    "paper_mnist1d": from_markdown(os.path.join("mnist1d", "results.md")),
}


def main():
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    for name, render in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", re.S)
        if not pattern.search(text):
            continue
        try:
            body = render()
        except FileNotFoundError as error:
            print(f"skipped {name}: {error.filename} is missing")
            continue
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
        print(f"updated {name}")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
