"""Tests for the instructor's tools: handout.py (blanking, the copy), grade.py (a grade per function), and
the grading table (tests/grading.py): it covers every public function, names real tests, and (slow) each
function's tests fail when it is blanked."""

import ast
import os
import textwrap

import pytest

import grade
import grading
import handout

ROOT = handout.ROOT

SOURCE = textwrap.dedent('''\
    """A module: "naïve" text before the functions, so columns in bytes and characters differ."""
    import functools

    LIMIT = 3


    def add(a, b):
        """a + b."""
        # the sum: a comment inside the body goes with it
        total = a + b
        return total


    def mul(a,
            b=(1, {"k": 2}),
            *rest) -> int:
        return a * b  # no docstring: the body starts after the signature's colon


    def one_liner(x): return f"{x}é"  # naïve


    def only_doc():
        """Nothing but a docstring."""


    def twice(x):
        """add(x, x): a function that uses another."""
        return add(x, x)


    class Box:
        """A box."""

        def __init__(self, w):
            self.w = w

        @property
        def area(self):
            """w squared."""
            return self.w * self.w

        @classmethod
        @functools.lru_cache(maxsize=None)
        def unit(cls):
            """A 1-wide box."""
            return cls(1)


    def _private():
        return 0
    ''')

TESTS = textwrap.dedent('''\
    import pytest
    import calc

    def test_add_small():
        assert calc.add(1, 2) == 3

    @pytest.mark.parametrize("a", [0, 5])
    def test_add_zero(a):
        assert calc.add(a, 0) == a

    def test_mul():
        assert calc.mul(2, 3) == 6

    def test_nothing_about_one_liner():
        assert True

    def test_twice():
        assert calc.twice(4) == 8
    ''')

FAKE_TABLE = {"calc.add": ["test_add_small", "test_add_zero"],
              "calc.mul": ["test_calc.py::test_mul"],
              "calc.one_liner": ["test_calc.py::test_nothing_about_one_liner"],
              "calc.twice": ["test_twice"]}


def fake_project(folder):
    """A project of one module, calc.py, with its tests: small enough that pytest runs it in a second."""
    os.makedirs(os.path.join(folder, "tests"))
    files = {"calc.py": SOURCE, "tests/test_calc.py": TESTS, "pytest.ini": "[pytest]\ntestpaths = tests\n",
             "README.md": "# calc\n\nAdds.", "tests/conftest.py": "import os, sys\nsys.path.insert(0, "
             "os.path.dirname(os.path.dirname(os.path.abspath(__file__))))\n"}
    for rel, text in files.items():
        with open(os.path.join(folder, rel), "w", encoding="utf-8") as f:
            f.write(text)
    return str(folder)


@pytest.fixture
def fake_table(monkeypatch):
    monkeypatch.setattr(grading, "GRADED_BY", FAKE_TABLE)
    monkeypatch.setattr(grading, "ASSIGNMENTS", {"sums": ("sums", ["calc.add"])})


def function_node(tree, dotted):
    return handout.find_function(tree, *handout.split_name(dotted))


def blanked(source, names):
    tree = ast.parse(source)
    return handout.blank_source(source, [(n, function_node(tree, n)) for n in names])


# --- blanking ---------------------------------------------------------------------------

NAMES = ["calc.add", "calc.mul", "calc.one_liner", "calc.only_doc", "calc.Box.__init__", "calc.Box.area",
         "calc.Box.unit"]


def test_blanking_keeps_signature_decorators_and_docstring_and_raises_with_the_name():
    before, after = ast.parse(SOURCE), ast.parse(blanked(SOURCE, NAMES))
    for name in NAMES:
        old, new = function_node(before, name), function_node(after, name)
        assert ast.dump(old.args) == ast.dump(new.args) and ast.dump(old.returns or ast.Pass()) == \
            ast.dump(new.returns or ast.Pass()), name
        assert [ast.dump(d) for d in old.decorator_list] == [ast.dump(d) for d in new.decorator_list], name
        assert ast.get_docstring(old) == ast.get_docstring(new), name
        body = new.body[1:] if ast.get_docstring(new) is not None else new.body
        assert len(body) == 1 and ast.unparse(body[0]) == f"raise NotImplementedError('{name}: fill me in')", name


def test_blanking_changes_only_the_bodies():
    text = blanked(SOURCE, ["calc.add", "calc.mul"])
    assert "total" not in text and "a comment inside the body" not in text and "a * b" not in text
    assert text.startswith(SOURCE[:SOURCE.index("    # the sum")]), "everything above the first body is kept"
    assert text.endswith(SOURCE[SOURCE.index("\n\ndef one_liner"):]), "everything below the last body is kept"
    assert '    *rest) -> int:\n    raise NotImplementedError("calc.mul: fill me in")\n' in text
    one = blanked(SOURCE, ["calc.one_liner"])
    assert 'def one_liner(x): raise NotImplementedError("calc.one_liner: fill me in")  # naïve\n' in one


def test_blanking_the_real_stage_files_keeps_them_python(tmp_path):
    names = ["bpe.merge_pair", "bpe.Tokenizer.load", "bpe.Tokenizer.encoding", "model.GPT.generate",
             "model.CausalSelfAttention.forward", "train.set_rng_state"]
    for filename, functions in handout.resolve(ROOT, names).items():
        with open(os.path.join(ROOT, filename), encoding="utf-8") as f:
            source = f.read()
        text = handout.blank_source(source, functions)
        lines = handout.def_lines(text, [name for name, _ in functions])
        for name, node in functions:
            new = function_node(ast.parse(text), name)
            assert new.lineno == lines[name] and ast.get_docstring(new) == ast.get_docstring(node)
            assert f'raise NotImplementedError("{name}: fill me in")' in text.splitlines()[new.end_lineno - 1]
        assert len(text.splitlines()) < len(source.splitlines())


def test_header_end_and_char_col_find_the_signatures_colon():
    lines = SOURCE.splitlines(keepends=True)
    node = function_node(ast.parse(SOURCE), "calc.mul")
    line, col = handout.header_end(lines, node)
    assert lines[line - 1][:col].endswith("-> int:")
    prefix = 's = "naïve"; '
    assert handout.char_col([prefix + "t = 1\n"], 1, len(prefix.encode("utf-8"))) == len(prefix)
    assert handout.has_docstring(function_node(ast.parse(SOURCE), "calc.add"))
    assert not handout.has_docstring(node)


@pytest.mark.parametrize("name, says", [
    ("bpe.merge_pairs", "no function or class 'merge_pairs' in bpe.py (did you mean merge_pair?)"),
    ("bpee.merge_pair", "unknown module 'bpee'"),
    ("bpe._split_on_specials", "is private"),
    ("model.GPT", "is a class, not a function: name one of its methods (e.g. model.GPT.num_params)"),
    ("bpe.SPECIAL_TOKENS", "'bpe.SPECIAL_TOKENS' is not a function: SPECIAL_TOKENS is a value assigned in bpe.py"),
    ("model.GPT.fwd", "no method 'fwd' in class GPT of model.py"),
    ("bpe.merge_pair.x", "bpe.merge_pair is a function, not a class"),
    ("merge_pair", "name a function as module.function or module.Class.method"),
])
def test_bad_names_are_one_line_exit_2_and_nothing_written(name, says, tmp_path, capsys):
    out = tmp_path / "hw"
    assert handout.main(["--blank", f"bpe.merge_pair,{name}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("handout.py: error: ") and says in err, err
    assert not out.exists()


def test_unknown_assignment_and_no_out_are_one_line(tmp_path, capsys):
    assert handout.main(["--assignment", "tokeniser", "--out", str(tmp_path / "hw")]) == 2
    assert capsys.readouterr().err == ("handout.py: error: unknown assignment 'tokeniser': the assignments are "
                                       + ", ".join(grading.ASSIGNMENTS) + "\n")
    assert handout.main(["--blank", "bpe.merge_pair"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


# --- the copy ---------------------------------------------------------------------------

def test_handout_of_an_assignment_copies_the_project_and_lists_the_functions(tmp_path, capsys):
    out = tmp_path / "hw"
    assert handout.main(["--assignment", "rlhf", "--out", str(out)]) == 0
    functions = grading.ASSIGNMENTS["rlhf"][1]
    printed = capsys.readouterr().out
    assert f"{len(functions)} functions to fill in" in printed and all(f in printed for f in functions)
    assert sorted(handout.project_files(str(out))) == sorted(handout.project_files(ROOT))
    for rel in handout.project_files(ROOT):
        if rel not in ("ppo.py", "README.md"):
            assert (out / rel).read_bytes() == open(os.path.join(ROOT, rel), "rb").read(), rel
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    section = readme[readme.index("## Your assignment"):]
    ppo_lines = (out / "ppo.py").read_text(encoding="utf-8").splitlines()
    for name in functions:
        line = int(section.split(f"| `{name}` | `ppo.py:")[1].split("`")[0])
        assert ppo_lines[line - 1].startswith(f"def {name.split('.')[-1]}(")
        assert f'raise NotImplementedError("{name}: fill me in")' in "\n".join(ppo_lines)
    assert "python tests/grade.py --assignment rlhf" in section


def test_project_files_walk_a_folder_outside_git(tmp_path):
    project = fake_project(tmp_path / "p")
    os.makedirs(os.path.join(project, "data"))
    open(os.path.join(project, "data", "big.bin"), "w").close()
    assert handout.project_files(project) == ["README.md", "calc.py", "pytest.ini", "tests/conftest.py",
                                              "tests/test_calc.py"]


def test_a_used_out_is_refused_unless_forced_and_other_files_are_kept(tmp_path, capsys):
    project, out = fake_project(tmp_path / "p"), tmp_path / "hw"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["--root", project, "--blank", "calc.add", "--out", str(out)]
    assert handout.main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err and not (out / "calc.py").exists()
    assert handout.main(args + ["--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep me" and "calc.add: fill me in" in (out / "calc.py").read_text()
    with pytest.raises(handout.HandoutError, match="inside the project"):
        handout.check_out_dir(project, os.path.join(project, "hw"), force=False)


def test_readme_section_names_each_function_and_the_grade_command(fake_table):
    where = {"calc.add": ("calc.py", 7), "calc.Box.area": ("calc.py", 30)}
    section = handout.readme_section(where)
    assert "| `calc.add` | `calc.py:7` |" in section and "| `calc.Box.area` | `calc.py:30` |" in section
    assert "python tests/grade.py --only calc.add,calc.Box.area" in section
    section = handout.readme_section({"calc.add": ("calc.py", 7)}, "sums")
    assert "## Your assignment: sums" in section and "grades each\nfunction alone" in section
    assert "python tests/grade.py --assignment sums" in section


def test_list_shows_every_assignment(capsys):
    assert handout.main(["--list"]) == 0
    printed = capsys.readouterr().out
    for name, (title, functions) in grading.ASSIGNMENTS.items():
        assert f"{name}: {title}" in printed and all(f"  {f}\n" in printed for f in functions)
    assert handout.assignment_functions("rlhf") == grading.ASSIGNMENTS["rlhf"][1]


# --- grading ----------------------------------------------------------------------------

def test_grade_a_handout_zero_for_the_blanked_function_full_for_the_others(tmp_path, fake_table, capsys):
    project, out = fake_project(tmp_path / "p"), str(tmp_path / "hw")
    assert handout.main(["--root", project, "--assignment", "sums", "--out", out]) == 0
    capsys.readouterr()
    assert grade.main([out, "-v", "--reference", project]) == 0
    printed = capsys.readouterr().out
    assert "calc.add        0/3   <-\n    failed: test_calc.py::test_add_small\n" in printed, printed
    assert "calc.mul        1/1\n" in printed and "calc.one_liner  1/1\n" in printed
    assert "calc.twice      1/1\n" in printed, "graded alone: twice runs with the reference's add"
    assert "score: 3/4 functions pass all their tests (75%); 3/6 tests pass (50%)" in printed
    assert grade.main([out, "--reference", out]) == 0  # the student's view: the copy as it is
    assert "calc.twice      0/1   <-" in capsys.readouterr().out
    assert grade.main([project, "--assignment", "sums", "--reference", project]) == 0
    assert "calc.add  3/3" in capsys.readouterr().out


def test_a_students_function_is_graded_with_its_helpers_and_imports(tmp_path, fake_table, capsys):
    project, out = fake_project(tmp_path / "p"), str(tmp_path / "hw")
    assert handout.main(["--root", project, "--assignment", "sums", "--out", out]) == 0
    source = (tmp_path / "hw" / "calc.py").read_text(encoding="utf-8")
    source = source.replace('raise NotImplementedError("calc.add: fill me in")', "return _plus(a, b)")
    source += "\n\nimport operator\n\n\ndef _plus(a, b):\n    return operator.add(a, b)\n"
    (tmp_path / "hw" / "calc.py").write_text(source.replace("return add(x, x)", "return 0"), encoding="utf-8")
    assert grade.changed_functions(out, project, list(FAKE_TABLE)) == ["calc.add", "calc.twice"]
    spliced = grade.splice(open(os.path.join(project, "calc.py"), encoding="utf-8").read(), source, "calc.add")
    assert "return _plus(a, b)" in spliced and "def _plus(a, b):" in spliced and "import operator" in spliced
    assert "total = a + b" not in spliced and spliced.count("def add(") == 1
    capsys.readouterr()
    assert grade.main([out, "--reference", project]) == 0
    printed = capsys.readouterr().out
    assert "calc.add        3/3\n" in printed and "calc.twice      0/1   <-" in printed, printed
    assert grade.splice(SOURCE, "x = 1\n", "calc.add") is None, "a copy without the function: no splice"


def test_grade_uses_the_graders_tests_not_the_students(tmp_path, fake_table, capsys):
    project, out = fake_project(tmp_path / "p"), str(tmp_path / "hw")
    assert handout.main(["--root", project, "--assignment", "sums", "--out", out]) == 0
    with open(os.path.join(out, "tests", "test_calc.py"), "w") as f:
        f.write("def test_add_small():\n    pass\n")  # a student who rewrote the test
    capsys.readouterr()
    assert grade.main([out, "--assignment", "sums", "--reference", project]) == 0
    assert "calc.add  0/3   <-" in capsys.readouterr().out
    assert grade.student_files(out) == ["calc.py"]


def test_grade_counts_missing_tests_as_failed_and_skipped_as_neither(fake_table):
    results = {"test_calc.py::test_add_zero[0]": "passed", "test_calc.py::test_add_zero[5]": "skipped"}
    grades = grade.grade(["calc.add", "calc.mul"], dict.fromkeys(["calc.add", "calc.mul"], results))
    assert grades["calc.add"] == (1, 2, [("test_calc.py::test_add_small", "missing")])
    assert grades["calc.mul"] == (0, 1, [("test_calc.py::test_mul", "missing")])
    assert grade.entry_outcomes("test_calc.py::test_add_zero[5]", results) == [("test_calc.py::test_add_zero[5]",
                                                                                  "skipped")]
    assert grade.split_entry("test_x.py::test_y[a-b]") == ("test_x.py", "test_y", "[a-b]")
    assert grade.test_entries(["calc.add", "calc.add", "calc.mul"]) == [
        "test_calc.py::test_add_small", "test_calc.py::test_add_zero", "test_calc.py::test_mul"]
    text = grade.report(grades)
    assert "score: 0/2 functions pass all their tests (0%); 1/3 tests pass (33%)" in text
    assert grade.percent(1, 3) == "33%" and grade.percent(0, 0) == "-"


def test_grade_a_broken_test_file_counts_its_tests_as_failed(tmp_path, fake_table):
    project = fake_project(tmp_path / "p")
    with open(os.path.join(project, "calc.py"), "a") as f:
        f.write("\ndef broken(:\n")
    results = grade.run_tests(project, grade.test_entries(FAKE_TABLE))
    assert results == {}, "calc.py does not import: nothing passes"
    assert grade.defined_tests(project) == {"test_calc.py": {"test_add_small", "test_add_zero", "test_mul",
                                                             "test_nothing_about_one_liner", "test_twice"}}
    grades = grade.grade(["calc.mul"], {"calc.mul": results})
    assert grades["calc.mul"] == (0, 1, [("test_calc.py::test_mul", "missing")])


def test_grade_bad_requests_are_one_line(tmp_path, fake_table, capsys):
    assert grade.main([str(tmp_path)]) == 2
    assert "is not a copy of the project: no .py files there" in capsys.readouterr().err
    assert grade.main([ROOT, "--reference", str(tmp_path)]) == 2
    assert "is not the project (no pytest.ini" in capsys.readouterr().err
    assert grade.main([ROOT, "--only", "calc.ad"]) == 2
    assert capsys.readouterr().err == ("grade.py: error: 'calc.ad' is not in the grading table (tests/grading.py) "
                                       "(did you mean calc.add?)\n")
    with pytest.raises(grade.GradeError, match="unknown assignment 'nope'"):
        grade.select_functions(assignment="nope")
    assert grade.select_functions() == list(FAKE_TABLE)


def test_verify_catches_a_function_whose_tests_fail_and_names_one_that_is_missed(tmp_path, fake_table, capsys):
    project = fake_project(tmp_path / "p")
    statuses, broken = grade.verify(project, ["calc.add"])
    assert statuses == {"calc.add": ("caught", [])} and broken == []
    printed = capsys.readouterr().out
    assert "[1/1] calc.add: caught\n" in printed and "verify: 1/1 functions caught" in printed
    copy = grade.copy_project(project, str(tmp_path / "copy"))
    assert grade.verify_one(copy, "calc.one_liner") == ("missed", ["test_calc.py::test_nothing_about_one_liner"])
    assert open(os.path.join(copy, "calc.py"), encoding="utf-8").read() == SOURCE, "the blanked file is put back"


def test_read_junit_takes_the_worst_outcome_of_a_case(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_x[1]"/>'
                    '<testcase classname="tests.test_a" name="test_x[1]"><error/></testcase>'
                    '<testcase classname="tests.test_a" name="test_y"><skipped/></testcase>'
                    '<testcase classname="" name="tests.test_b"><error/></testcase></testsuite></testsuites>')
    assert grade.read_junit(str(path)) == {"test_a.py::test_x[1]": "failed", "test_a.py::test_y": "skipped"}


def test_public_functions_are_top_level_functions_and_methods_init_kept_private_left_out(tmp_path):
    project = fake_project(tmp_path / "p")
    assert grade.public_functions(project, stages=("calc",)) == [
        "calc.add", "calc.mul", "calc.one_liner", "calc.only_doc", "calc.twice", "calc.Box.__init__", "calc.Box.area",
        "calc.Box.unit"]


# --- the table --------------------------------------------------------------------------

def test_the_table_grades_every_public_function():
    public = grade.public_functions(ROOT)
    missing = [f for f in public if f not in grading.GRADED_BY]
    stale = [f for f in grading.GRADED_BY if f not in public]
    assert not missing, (f"tests/grading.py lacks {len(missing)} public functions; add each to GRADED_BY with the "
                         f"tests that fail when it is blanked: {', '.join(missing)}")
    assert not stale, f"tests/grading.py names {len(stale)} functions that are not public functions: {', '.join(stale)}"
    assert len(public) == len(set(public))


def test_the_table_names_tests_that_exist_and_run_by_default():
    defined = grade.defined_tests(ROOT)
    slow = set()
    for filename in defined:
        with open(os.path.join(ROOT, "tests", filename), encoding="utf-8") as f:
            slow |= {f"{filename}::{n.name}" for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)
                     and any("slow" in ast.unparse(d) for d in n.decorator_list)}
    unknown = [(f, e) for f in grading.GRADED_BY for e in grade.tests_of(f)
               if grade.split_entry(e)[1] not in defined.get(grade.split_entry(e)[0], ())]
    assert not unknown, f"tests/grading.py names tests that do not exist (renamed?): {unknown}"
    marked = [e for f in grading.GRADED_BY for e in grade.tests_of(f) if e.split("[")[0] in slow]
    assert not marked, f"grading tests must run by default, these are marked slow: {marked}"
    assert all(entries for entries in grading.GRADED_BY.values())


def test_each_assignment_names_functions_of_the_table():
    for name, (title, functions) in grading.ASSIGNMENTS.items():
        assert title and functions and name.isidentifier()
        assert not [f for f in functions if f not in grading.GRADED_BY], name


@pytest.mark.slow
@pytest.mark.parametrize("function", list(grading.GRADED_BY))
def test_each_functions_tests_fail_when_it_is_blanked(function, project_copy):
    status, still_passing = grade.verify_one(project_copy, function)
    assert status == "caught", f"{function} blanked: {status}; these tests still pass: {still_passing}"


@pytest.mark.slow
@pytest.mark.parametrize("assignment", list(grading.ASSIGNMENTS))
def test_each_handout_fails_its_own_tests_and_passes_all_the_others(assignment, tmp_path):
    functions = grading.ASSIGNMENTS[assignment][1]
    handout.write_handout(ROOT, str(tmp_path / "hw"), functions, assignment)
    every = list(grading.GRADED_BY)
    grades = grade.grade(every, grade.grade_alone(str(tmp_path / "hw"), ROOT, every))
    passing_own = [f for f in functions if grades[f][0] > 0]
    assert not passing_own, f"{assignment}: blanked, these still pass some of their tests: {passing_own}"
    failing = [f for f in every if f not in functions and grades[f][0] < grades[f][1]]
    assert not failing, f"{assignment}: graded alone, other functions fail in the handout: {failing}"


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    return grade.copy_project(ROOT, str(tmp_path_factory.mktemp("project")))
