"""The docs cannot drift: every relative link in README.md and docs/ resolves (anchors included), and every
command of the README's quickstarts that can run on a CPU does run, in order, in a fresh copy of the repo."""

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading in {linked.name}"


# Quickstart lines that need what CI does not have: a GPU, a model hub or the network (WAInjectBench's data), several
# machines (tests/test_distributed.py runs two nodes on one machine).
NEEDS_MORE_THAN_A_CPU = ("single_gpu.yaml", "llava-hf/", "multi_node.yaml", "WAInjectBench.git", "wainject/")


def quickstart_commands() -> list[str]:
    """Every command line in the README's bash blocks after the first (the install lines, which CI itself runs)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [re.split(r"\s+#", line)[0].strip()
             for block in blocks[1:] for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_the_readme_quickstart_commands_run_on_a_cpu(tmp_path):
    commands = quickstart_commands()
    runnable = [c for c in commands if not any(needs in c for needs in NEEDS_MORE_THAN_A_CPU)]
    assert len(runnable) >= 8 and any("train_llava.py" in c for c in runnable), commands  # the parser still finds them
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".*cache"))
    for command in runnable:
        args = shlex.split(command)
        if args[:2] == ["accelerate", "launch"]:
            args = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                    *args[2:]]
        elif args[0] == "python":
            args = [sys.executable, *args[1:]]
        if any(a.startswith("train_") or a == "tools/demo.py" for a in args):  # two optimizer steps show it runs
            args += ["--max_steps", "2"]
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
