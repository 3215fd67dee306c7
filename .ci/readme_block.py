"""Print the first ```bash (or ```LANG) block under a README heading: `python .ci/readme_block.py Tests [LANG]`. CI
runs the README's blocks as they are written, so the README and CI cannot drift apart."""

import sys
from pathlib import Path

heading, fence = "## " + sys.argv[1], "```" + (sys.argv[2] if len(sys.argv) > 2 else "bash")
lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
if heading not in lines:
    sys.exit(f"README.md has no heading {heading!r}")
rest = lines[lines.index(heading) + 1:]
start = next((i for i, line in enumerate(rest) if line.strip() == fence), None)
if start is None or any(line.startswith("## ") for line in rest[:start]):
    sys.exit(f"README.md has no {fence} block under {heading!r}")
end = next(i for i in range(start + 1, len(rest)) if rest[i].strip() == "```")
print("\n".join(rest[start + 1:end]))
