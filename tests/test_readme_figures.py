"""Provenance of the README's figures: every cited result file exists and holds the numbers.

The README is split into units: Markdown tables and paragraphs (a list item is a paragraph;
fenced code blocks are skipped). A unit *cites* a result file by naming it, either as a path
``benchmarks/results/<...>`` or by its bare dated name (``2026-12-06-regnet-phantoms-3d.md``),
anywhere in the README (in code spans too). The checks:

1. every cited file exists under ``benchmarks/results/``;
2. a table with figures (decimal numbers or ratios) in its body cites at least one file: in
   the table or, failing that, in the nearest paragraph above it in the same section that
   cites; every number of the body of a table (outside code spans) appears in one of those
   files; integer-only tables without a citation (options, exit codes) are not checked;
3. in a paragraph that cites files, every *figure* outside code spans -- a number with a
   decimal point or a ratio such as ``4.7x`` -- appears in one of that paragraph's files
   (settings such as ``--set lr=1e-4`` go in code spans);
4. a paragraph that reports measurements cites at least one file: one that says "measured",
   or holds a figure that reads as a result ("Dice 0.81", "0.67 mm", "9.4 s", "4.7x").

"Appears" means: the file's text (Markdown, JSON, CSV, plain text; a PNG only counts as
existing) contains a number that rounds to the README's number at the README's precision
(0.61 matches 0.606; ``4.7x`` matches 4.70). Percent signs and thousands separators are
ignored; signs are ignored. Nothing here names a section, so sections added later with their
own result files are checked the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

#: A dated result file named without its folder, e.g. ``2026-11-22-0620-affine-rerun.md``.
_BARE = re.compile(r"(?<![\w/.-])(\d{4}-\d{2}-\d{2}-[A-Za-z0-9_.+-]*[A-Za-z0-9_])")
#: A path under ``benchmarks/results/`` (a file, not the folder itself).
_PATH = re.compile(r"benchmarks/results/([A-Za-z0-9_.+/-]*[A-Za-z0-9_])")
_EXT = (".md", ".json", ".txt", ".csv", ".png", ".svg", ".tsv")
#: A number: digits with optional thousands separators, decimals and exponent.
_NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?([eE][-+]?\d+)?(x\b|×)?(?![\w])"
)
_CODE = re.compile(r"`[^`]*`")
#: A figure that reads as a measurement: a decimal after "Dice", "error", "mean" or "median",
#: or before a unit of length, time or a ratio ("0.67 mm", "9.4 s", "4.7x").
_RESULT_LIKE = re.compile(r"\b(Dice|error|mean|median)\s+\d+\.\d+"
                          r"|(?<![\w.])\d+\.\d+\s*(mm|s|x|×)(?!\w)", re.IGNORECASE)
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


@dataclass
class Unit:
    kind: str  # "table" or "paragraph"
    line: int  # 1-based first line in the README
    lines: list[str]
    cites: list[str] = field(default_factory=list)
    section: int = 0  # number of headings above it

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def cited_files(text: str) -> list[str]:
    """Result files that `text` names (relative to ``benchmarks/results/``), in order."""
    found: list[str] = []
    for m in _PATH.finditer(text):
        name = m.group(1)
        if name.endswith(_EXT) and name not in found:
            found.append(name)
    for m in _BARE.finditer(text):
        name = m.group(1)
        start = m.start(1)
        if text[max(0, start - len("results/")):start] == "results/":
            continue  # already taken as a path
        if name.endswith(_EXT) and name not in found:
            found.append(name)
    return found


def split_units(markdown: str) -> list[Unit]:
    """Tables and paragraphs of `markdown`, without fenced code blocks and headings."""
    units: list[Unit] = []
    current: Unit | None = None
    fenced = False
    lines = markdown.splitlines()
    in_table = False
    section = 0
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            current = None
            continue
        if not fenced and stripped.startswith("#"):
            section += 1
        if fenced or not stripped or stripped.startswith("#"):
            current = None
            in_table = False
            continue
        # A table starts at a "|" line followed by its |---| separator and runs while lines
        # start with "|" (a paragraph line that happens to start with "|" stays prose).
        if stripped.startswith("|"):
            if not in_table and i < len(lines) and _SEPARATOR.match(lines[i]):
                in_table = True
                current = None
        else:
            in_table = False
        kind = "table" if in_table else "paragraph"
        new_item = kind == "paragraph" and re.match(r"([*+-]|\d+\.)\s", stripped) is not None
        if current is None or current.kind != kind or new_item:
            current = Unit(kind, i, [], section=section)
            units.append(current)
        current.lines.append(line)
    for unit in units:
        unit.cites = cited_files(unit.text)
    return units


def _strip_code(text: str) -> str:
    # Citations and settings live in code spans; dated file names are not figures either.
    text = _CODE.sub(" ", text)
    text = _PATH.sub(" ", text)
    return _BARE.sub(" ", text)


@dataclass(frozen=True)
class Number:
    token: str
    value: float
    decimals: int  # digits after the point (for exponent forms, of the mantissa)
    exponent: int
    ratio: bool

    @property
    def is_figure(self) -> bool:
        return self.decimals > 0 or self.ratio


def numbers(text: str) -> list[Number]:
    """The numbers of `text` outside code spans (unsigned)."""
    out = []
    for m in _NUMBER.finditer(_strip_code(text)):
        whole, frac, exp, ratio = m.groups()
        token = whole + (frac or "") + (exp or "")
        value = float(token.replace(",", ""))
        out.append(Number(m.group(0), value, len(frac) - 1 if frac else 0,
                          int(exp[1:]) if exp else 0, ratio is not None))
    return out


def _file_values(path: Path) -> list[float]:
    if path.suffix in (".png", ".svg"):
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return [float((w + (f or "") + (e or "")).replace(",", ""))
            for w, f, e, _ in _NUMBER.findall(text)]


_CACHE: dict[Path, list[float]] = {}


def values_of(path: Path) -> list[float]:
    if path not in _CACHE:
        _CACHE[path] = _file_values(path)
    return _CACHE[path]


def appears(number: Number, values: list[float]) -> bool:
    """Whether some value rounds to `number` at its precision."""
    half = 0.5 * 10.0 ** (number.exponent - number.decimals)
    tol = half * (1 + 1e-9) + 1e-12
    return any(math.isfinite(v) and abs(abs(v) - number.value) <= tol for v in values)


def unit_files(units: list[Unit], i: int) -> list[str]:
    """The result files that unit `i` is checked against: its own citations and, for a table
    that names none, those of the nearest paragraph above it in the same section that names
    some."""
    unit = units[i]
    files = list(unit.cites)
    if unit.kind == "table" and not files:
        for before in reversed(units[:i]):
            if before.section != unit.section:
                break
            if before.kind == "paragraph" and before.cites:
                files = list(before.cites)
                break
    return files


def check(markdown: str, results: Path) -> list[str]:
    """Every provenance problem of `markdown` against the files under `results`."""
    problems: list[str] = []
    units = split_units(markdown)
    for name in cited_files(markdown):
        if not (results / name).is_file():
            problems.append(f"cited result file benchmarks/results/{name} does not exist")

    def missing(unit: Unit, files: list[str], only_figures: bool) -> None:
        paths = [results / f for f in files if (results / f).is_file()]
        if not paths:
            return  # reported above (missing file) or below (no citation)
        values = [v for p in paths for v in values_of(p)]
        lines = unit.lines[2:] if unit.kind == "table" else unit.lines
        for offset, line in enumerate(lines):
            for num in numbers(line):
                if only_figures and not num.is_figure:
                    continue
                if not appears(num, values):
                    where = unit.line + offset + (2 if unit.kind == "table" else 0)
                    problems.append(f"README line {where}: {num.token!r} is not in "
                                    f"{', '.join(files)}")

    for i, unit in enumerate(units):
        if unit.kind == "table":
            body = "\n".join(unit.lines[2:])
            files = unit_files(units, i)
            if not files and not any(n.is_figure for n in numbers(body)):
                continue  # a table of options or codes, not of measurements
            if not files:
                problems.append(f"README line {unit.line}: a table of numbers cites no result "
                                f"file (in the table or the paragraph before it)")
                continue
            missing(unit, files, only_figures=False)
        else:
            if unit.cites:
                missing(unit, unit.cites, only_figures=True)
            elif re.search(r"\bmeasured\b", _strip_code(unit.text), re.IGNORECASE) \
                    or _RESULT_LIKE.search(_strip_code(unit.text)):
                problems.append(f"README line {unit.line}: a paragraph of measurements cites "
                                f"no result file")
    return problems


# ------------------------------------------------------------------------------- the README
def test_every_readme_figure_is_in_the_result_file_it_cites():
    problems = check(README.read_text(encoding="utf-8"), RESULTS)
    assert not problems, "\n".join(problems)


def test_the_readme_cites_result_files():
    # The check above is vacuous if nothing is cited.
    assert len(cited_files(README.read_text(encoding="utf-8"))) >= 3


# ------------------------------------------------------------------- the checker, on its own
_RESULT = """# run
| method | Dice | time s |
|---|---|---|
| a | 0.8123 | 12.4 |
| b | 0.7 | 3 |

X-CoReg iteration grows 5.64x from N = 4 to 32; mean 0.606 ± 0.072 mm.
"""

_README = """# demo

Measured on phantoms (`benchmarks/results/2026-01-01-run.md`):

| method | Dice | time s |
|---|---|---|
| a | 0.812 | 12.4 |
| b | 0.700 | 3 |

An iteration costs 5.6x more at N = 32 and the error is 0.61 mm (`2026-01-01-run.md`).

```bash
itreg register a b --set lr=0.123   # not a figure
```

Setting `--set bending=0.37` (paragraph without figures to check).
"""


@pytest.fixture()
def results(tmp_path):
    (tmp_path / "2026-01-01-run.md").write_text(_RESULT, encoding="utf-8")
    return tmp_path


def test_checker_accepts_figures_that_round_from_the_file(results):
    assert check(_README, results) == []


@pytest.mark.parametrize("old, new", [
    ("| a | 0.812 |", "| a | 0.813 |"),      # a table number changed
    ("| b | 0.700 | 3 |", "| b | 0.700 | 9 |"),  # an integer cell changed
    ("5.6x more", "4.7x more"),              # a ratio in a citing paragraph
    ("0.61 mm", "0.46 mm"),                  # a decimal figure in a citing paragraph
])
def test_checker_rejects_a_number_that_is_not_in_the_file(results, old, new):
    changed = _README.replace(old, new)
    assert changed != _README
    problems = check(changed, results)
    assert len(problems) == 1 and repr(new.split("|")[-2].strip() if "|" in new
                                       else new.split()[0]) in problems[0], problems


def test_checker_rejects_a_missing_file_and_uncited_tables_and_measurements(results):
    missing = _README.replace("2026-01-01-run.md`):", "2026-01-02-run.md`):")
    problems = check(missing, results)
    assert any("2026-01-02-run.md does not exist" in p for p in problems)
    uncited = _README.replace("(`benchmarks/results/2026-01-01-run.md`)", "")
    problems = check(uncited, results)
    assert any("cites no result file" in p for p in problems)
    options = "Options:\n\n| option | meaning |\n|---|---|\n| `--seed N` | 0 .. 2^32 - 1 |\n"
    assert check(options, results) == []
    # A table under a lead-in line takes the citation of the paragraph above, in its section.
    lead_in = _README.replace("Measured on phantoms (`benchmarks/results/2026-01-01-run.md`):",
                              "Measured on phantoms (`benchmarks/results/2026-01-01-run.md`).\n"
                              "\nAffine, 2 methods:")
    assert check(lead_in, results) == []
    other_section = lead_in.replace("\nAffine, 2 methods:", "\n## other\n\nAffine, 2 methods:")
    assert any("table of numbers cites no result file" in p
               for p in check(other_section, results))
    for prose in ("Measured: the error is 0.61 mm.\n", "The error falls to 0.61 mm.\n",
                  "An iteration costs 4.7x more.\n", "Refining gives Dice 0.846.\n"):
        assert any("cites no result file" in p for p in check(prose, results)), prose
    assert check("Settings: `--set lr=0.5`, a 0.9-1.1 bias field, 3 mm slices.\n",
                 results) == []


def test_split_units_separates_tables_paragraphs_and_list_items():
    units = split_units("para one\nstill one\n\n| a |\n|---|\n| 1 |\n* item 1\n* item 2\n"
                        "|x| is prose\n")
    assert [u.kind for u in units] == ["paragraph", "table", "paragraph", "paragraph"]
    assert units[1].line == 4
    assert units[3].lines == ["* item 2", "|x| is prose"]


def test_every_figure_of_a_citing_unit_is_checked():
    # Replace each README decimal figure outside code spans by a value no result file holds:
    # each one in a table or citing paragraph must then be reported.
    text = README.read_text(encoding="utf-8")
    units = split_units(text)
    cited_units = [u for i, u in enumerate(units)
                   if any((RESULTS / f).is_file() for f in unit_files(units, i))]
    expected = sum(1 for u in cited_units
                   for line in (u.lines[2:] if u.kind == "table" else u.lines)
                   for n in numbers(line) if n.decimals > 0)
    mutated = "\n".join(
        line if line.lstrip().startswith("```") else
        re.sub(r"(?<![\w.`/-])\d+\.\d+(?![\w.`-])", "987.654321", line)
        for line in text.splitlines())
    problems = [p for p in check(mutated, RESULTS) if "'987.654321'" in p]
    assert expected >= 50
    assert len(problems) >= 0.9 * expected, (len(problems), expected)
