"""The papers' rows (slurm/paper_rows.py) against the README's tables and the training scripts'
docstring rows: every table row and every docstring row must be an entry of the rows data with the
same command and the same paper numbers, so neither can drift from the data `--reproduce` runs."""
import ast
import os
import re
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from conftest import REPO_ROOT  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "slurm"))
import paper_rows  # noqa: E402

README = open(os.path.join(REPO_ROOT, "README.md")).read()
# README heading of each table of rows -> the rows data's table
TABLES = {"### MSF (`train_msf.py`)": "msf",
          "### CMSF (`train_cmsf_self.py`, `train_cmsf_sup.py`, `train_cmsf_semi.py`)": "cmsf",
          "Semi-supervised (ImageNet, 10 % labels).": "semi",
          "### Small datasets: CIFAR-10, CIFAR-100, STL-10 (not measured here)": "small"}


def readme_table(heading):
    """The rows of the first markdown table after `heading`: a list of cell lists."""
    start = README.index(heading)
    lines = README[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[first + 2:]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def cell_number(cell):
    return None if cell in ("—", "not measured here") else float(cell)


def paper_numbers_of(table, cells, row):
    """The README row's numbers under the data's metric names."""
    if table in ("msf", "cmsf"):
        linear, knn_1, knn_20 = cells[2:5]
        return {"linear": cell_number(linear), "knn_1": cell_number(knn_1),
                "knn_20": cell_number(knn_20)}
    if table == "semi":
        metric = next(name for name in row.evaluations if not name.startswith("semi_knn"))
        return {metric: cell_number(cells[2])}
    knn, linear = cells[2:4]
    assert knn == linear == "not measured here"
    return {"linear": None, "knn_1": None, "knn_20": None}


@pytest.mark.parametrize("heading", TABLES)
def test_every_readme_table_row_is_its_entry_in_the_rows_data(heading):
    table = TABLES[heading]
    readme_rows = readme_table(heading)
    data_rows = [row for row in paper_rows.ROWS if row.table == table]
    assert [cells[0] for cells in readme_rows] == [row.title for row in data_rows]
    for cells, row in zip(readme_rows, data_rows):
        command = re.match(r"`([^`]+)`", cells[1]).group(1)  # prose may follow the command
        assert command == row.command, row.name
        numbers = paper_numbers_of(table, cells, row)
        assert numbers == {metric: row.paper.get(metric) for metric in numbers}, row.name
    # the sizes of the tables, so that a parsing slip cannot pass as an empty comparison
    assert len(readme_rows) == {"msf": 9, "cmsf": 9, "semi": 5, "small": 6}[table]


def test_readme_prose_rows_1pct_10pct_and_transfer_equal_the_rows_data():
    row = paper_rows.ROWS_BY_NAME["msf-ws-1m"]
    one, ten = re.search(r"1 % / 10 % ImageNet linear for MSF w/s: ([\d.]+) / ([\d.]+) top-1",
                         README).groups()
    assert (float(one), float(ten)) == (row.paper["linear_1pct"], row.paper["linear_10pct"])
    sentence = re.search(r"the MSF poster row is (.*?)mean ([\d.]+)", README, re.S)
    names = {"Food": "food101", "CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "SUN": "sun397",
             "Cars": "cars", "Aircraft": "aircraft", "DTD": "dtd", "Pets": "pets",
             "Caltech": "caltech101", "Flowers": "flowers"}
    readme = {f"transfer_{names[name]}": float(value) for name, value in
              re.findall(r"([A-Za-z0-9-]+) ([\d.]+),", " ".join(sentence.group(1).split()))}
    readme["transfer_mean"] = float(sentence.group(2))
    assert readme == {k: v for k, v in row.paper.items() if k.startswith("transfer_")}
    assert len(readme) == 11


def docstring_rows(script):
    """(base flags, [(title, numbers or None, flags)]) of the rows in a training script's
    docstring: a line `  TITLE  NUMBERS  FLAGS` (numbers `a / b / c`, `a` or `n/a`) or
    `  TITLE  FLAGS`; FLAGS end where prose in parentheses starts."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(REPO_ROOT, script)).read()))
    base = re.search(r"`python " + re.escape(script) + r" ([^`]+)`", doc).group(1).split()
    rows = []
    for line in doc.splitlines():
        numbered = re.match(r"  (\S.*?)\s+(\d+\.\d / \d+\.\d / \d+\.\d|\d+\.\d|n/a)\s+(.*)$", line)
        plain = re.match(r"  (\S.*?)\s{2,}(--.*|\(no more flags\))$", line)
        if numbered:
            title, numbers, rest = numbered.groups()
            numbers = None if numbers == "n/a" else [float(n) for n in numbers.split(" / ")]
        elif plain:
            (title, rest), numbers = plain.groups(), None
        else:
            continue
        words = []
        for word in rest.split():
            if word.startswith("("):
                break
            words.append(word)
        rows.append((title, numbers, words))
    return base, rows


def normalised_command(words):
    """script and flags of a command; the data path and example file names made neutral."""
    script, *flags = words
    flags = paper_rows_flags(flags)
    for flag in ("--data", "--noisy-labels", "--constraint-embeddings"):
        if flag in flags:
            flags[flag] = ("FILE",)
    return script, flags


def paper_rows_flags(words):
    flags, current = {}, None
    for word in words:
        if word.startswith("--"):
            current = word
            flags[current] = ()
        else:
            flags[current] += (word,)
    return flags


DOCSTRING_ROW_COUNTS = {"train_msf.py": 8, "train_cmsf_self.py": 3, "train_cmsf_semi.py": 5,
                        "train_cmsf_sup.py": 5}


@pytest.mark.parametrize("script", DOCSTRING_ROW_COUNTS)
def test_every_docstring_row_of_a_training_script_is_an_entry_of_the_rows_data(script):
    base, rows = docstring_rows(script)
    assert len(rows) == DOCSTRING_ROW_COUNTS[script], rows
    data = {}
    for row in paper_rows.ROWS:
        row_script, row_flags = normalised_command(row.command.split()[1:])
        data[row_script, frozenset(row_flags.items())] = row
    for title, numbers, words in rows:
        if words and words[0] == "python":  # a full command of another script
            command = words[1:]
        else:
            command = [script, *base, *words]
        script_of_row, flags = normalised_command(command)
        if script_of_row == script:  # the row's flags replace the base command's
            flags = {**paper_rows_flags(base), **flags}
            flags["--data"] = ("FILE",)
        row = data.get((script_of_row, frozenset(flags.items())))
        assert row is not None, (script, title, command)
        if row.table == "semi":
            metric = next(name for name in row.evaluations if not name.startswith("semi_knn"))
            assert numbers == (None if row.paper.get(metric) is None else [row.paper[metric]])
        elif numbers is None:
            assert row.paper == {}, (title, row.paper)
        else:
            assert numbers == [row.paper["linear"], row.paper["knn_1"], row.paper["knn_20"]]


def test_rows_have_what_reproduce_needs():
    import reproduce
    for row in paper_rows.ROWS:
        words = row.command.split()
        assert words[0] == "python" and os.path.isfile(os.path.join(REPO_ROOT, words[1]))
        assert set(row.evaluations) <= set(reproduce.EVALUATIONS) | {"transfer"}, row.name
        metrics = {"knn": ("knn_1", "knn_20")}
        known = {m for name in row.evaluations for m in metrics.get(name, (name,))}
        known |= {f"transfer_{n}" for n in reproduce.TRANSFER_DATASETS} | {"transfer_mean"}
        assert set(row.paper) <= known, (row.name, set(row.paper) - known)
    # the transfer stages and numbers are transfer_eval.py's datasets and its poster row
    import transfer_eval
    assert reproduce.TRANSFER_DATASETS == tuple(transfer_eval.DATASETS)
    assert {f"transfer_{name}": value for name, value in transfer_eval.POSTER_MSF.items()} == {
        k: v for k, v in paper_rows.TRANSFER_MSF.items() if k != "transfer_mean"}
    assert paper_rows.find_row("msf-ws-1M") == (None, ["msf-ws-1m", "msf-ws-128k",
                                                       "msf-ws-256k"])
