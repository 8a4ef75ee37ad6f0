"""Every command line of the README runs as written: each `make` line in its -n form (make checks
the targets and variables and prints the commands, running none), each script line through that
script's own argument parser (flags, choices and value ranges, no work done)."""
import importlib.util
import re
import shlex
import subprocess

import pytest
from conftest import ROOT

README = ROOT / "README.md"
PYTHONS = ("python", "python3", ".venv/bin/python")


def readme_commands():
    """(line number, command) of every line of the README's sh blocks and every inline `make ...`
    or `python ...` span, comments cut, continued lines joined."""
    text = README.read_text()
    commands = []
    for block in re.finditer(r"```sh\n(.*?)```", text, re.S):
        first = text[:block.start()].count("\n") + 2
        joined, start = "", None
        for k, line in enumerate(block.group(1).splitlines()):
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line:
                continue
            start = first + k if start is None else start
            joined += line.removesuffix("\\") + " "
            if not line.endswith("\\"):
                commands.append((start, joined.strip()))
                joined, start = "", None
    for span in re.finditer(r"`((?:make|python|\.venv/bin/python) [^`]+)`", text):
        commands.append((text[:span.start()].count("\n") + 1, " ".join(span.group(1).split())))
    return commands


def parse_with_the_script(words):
    """The script's parse_args on the words after it: argparse ends with SystemExit on a bad flag."""
    script = ROOT / words[0]
    spec = importlib.util.spec_from_file_location(f"readme_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(words[1:])


def test_the_readme_has_command_lines_to_check():
    commands = readme_commands()
    assert len(commands) >= 15
    assert any(c.startswith("make demo") for _, c in commands) and any("predict.py" in c for _, c in commands)


@pytest.mark.parametrize("line, command", readme_commands(), ids=lambda value: str(value)[:60])
def test_a_readme_command_line_runs_as_written(line, command):
    words = shlex.split(command)
    where = f"README.md line {line}: {command}"
    if words[0] == "make":
        out = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{where}\n{out.stderr}"
    elif words[0] in PYTHONS:
        assert len(words) > 1 and (ROOT / words[1]).is_file(), f"{where}: no such script"
        try:
            parse_with_the_script(words[1:])
        except SystemExit as e:
            pytest.fail(f"{where}: its arguments do not parse ({e})")
    else:
        pytest.fail(f"{where}: neither a make target nor a script of the toolkit")


def test_every_relative_link_of_the_readme_and_docs_finds_its_file():
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "models" / "reference" / "MODEL_CARD.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # a web address
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readmes_python_lines_classify_a_photo_as_predict_does(tmp_path, monkeypatch):
    """The README's Python block, run exactly as written on a real photo saved as lesion.jpg, gives
    predict.py's row for that photo."""
    import shutil

    import pandas as pd
    from conftest import SHARED_DATA

    import predict
    photo = SHARED_DATA / "ph2" / "images" / "IMD002.png"
    if not photo.is_file():
        pytest.skip("needs ../shared/data/ph2")
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    import cv2
    cv2.imwrite(str(tmp_path / "lesion.jpg"), cv2.imread(str(photo)))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    table, problems = scope["table"], scope["problems"]
    assert problems == [] and len(table) == 1
    predict.main(predict.parse_args(["lesion.jpg", "--age", "60", "--site", "back", "--out", "p.csv"]))
    expected = pd.read_csv("p.csv")
    assert list(table.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(table.astype(expected.dtypes.to_dict()), expected, check_exact=False, rtol=1e-9)
    shutil.copy(tmp_path / "lesion.jpg", tmp_path / "second.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    table, problems = scope["model"].predict(["second.jpg", "broken.jpg"])  # loaded once, called again
    assert len(table) == 1 and [(p.path, p.problem) for p in problems] == [("broken.jpg", "not a readable image")]


def test_every_make_target_that_names_no_file_is_phony():
    """A target named like a step (no path, no extension) is .PHONY: a file of that name would
    otherwise make it silently do nothing."""
    missing = []
    for makefile in ("Makefile", "studies.mk"):
        text = (ROOT / makefile).read_text().replace("\\\n", " ")
        phony = set(" ".join(re.findall(r"^\.PHONY:(.*)$", text, re.M)).split())
        targets = set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", text, re.M))
        missing += [f"{makefile}: {target}" for target in sorted(targets - phony)]
    assert not missing, missing


def test_the_readmes_code_map_names_every_section_of_common_py():
    """The README's table of common.py's sections follows the file: each section's name (before any
    colon or parenthesis) is in the table, and the table names no section the file lacks."""
    sections = [re.split(r"[:(]", line.removeprefix("# "))[0].strip() for line in
                re.findall(r"^# -{20,}\n(# .*)$", (ROOT / "common.py").read_text(), re.M)]
    text = README.read_text()
    table = text[text.index("| section of `common.py` |"):]
    table = table[:table.index("\n\n")]
    named = [name.strip() for row in table.splitlines()[2:] for name in row.split("|")[1].split(",")]
    assert len(sections) >= 10
    assert [s for s in sections if s not in named] == []
    assert [n for n in named if not any(s.endswith(n) for s in sections)] == []
