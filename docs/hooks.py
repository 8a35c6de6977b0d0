"""MkDocs hooks: the pages that live outside docs/.

- `index.md` is the README (the front page of the repository), its links to
  `docs/<page>.md` made links between pages;
- `changelog.md` is CHANGELOG.md;
- the benchmark plots under benchmarks/results/ become files of the site at
  the same paths, so the pages show them with the links the README uses
  (`benchmarks/results/...png`) and `mkdocs build --strict` checks them.
"""

import glob
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def index_markdown(readme):
    """The README as the site's home page."""
    text = re.sub(r"\]\(docs/([\w-]+\.md(#[\w-]*)?)\)", r"](\1)", readme)
    text = text.replace("](CHANGELOG.md)", "](changelog.md)")
    return text.replace("see [LICENSE](LICENSE)", "see the `LICENSE` file of the repository")


def on_files(files, config):
    def read(name):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            return f.read()

    files.append(File.generated(config, "index.md", content=index_markdown(read("README.md"))))
    files.append(File.generated(config, "changelog.md", content=read("CHANGELOG.md")))
    for path in sorted(
        glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "*.png"), recursive=True)
    ):
        files.append(
            File(
                os.path.relpath(path, ROOT), ROOT, config["site_dir"], config["use_directory_urls"]
            )
        )
    return files
