"""interlora.py copied alone: the README's "Using the layers in another project" block runs in
an empty folder that holds only interlora.py, in a fresh process without this project on its path
(transformers' LlamaForCausalLM as the host model)."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

MARKER = "<!-- copy-alone example -->"


def readme_block():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(MARKER) + 2  # the marker, then the ```python fence
    end = lines.index("```", start)
    return "\n".join(lines[start:end]) + "\n"


def test_the_readme_example_runs_with_interlora_py_alone(tmp_path):
    shutil.copy(ROOT / "interlora.py", tmp_path / "interlora.py")
    (tmp_path / "example.py").write_text(readme_block(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    # -E -s: no PYTHONPATH and no user site; the path starts with the example's own folder
    done = subprocess.run([sys.executable, "-E", "-s", "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copy-alone example: ok" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["example.py",
                                                                              "interlora.py"]
