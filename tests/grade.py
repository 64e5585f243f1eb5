"""
grade.py: a grade per function, from the tests that grade it (the table: tests/grading.py).

    python tests/grade.py                                  # this checkout, every function
    python tests/grade.py ../hw2 --assignment transformer  # a student's copy, one assignment
    python tests/grade.py ../hw2 --only bpe.merge_pair -v  # ... and the tests that still fail
    python tests/grade.py --verify --jobs 2                # check the table: blank each function, its tests must fail

A student's copy is graded one function at a time, against this checkout (the
reference, with the solutions): each function the student changed is spliced
into a scratch copy of the reference (with the helpers and imports the student
added to its file), and its grading tests run there, so it is graded alone: a
wrong merge_pair does not fail train_naive's tests, and a student's edits to
tests/ count for nothing. Functions the student left as they are pass or fail
with the reference. Run in the checkout itself (no DIR), the tests run once on
the code as it is: what a student sees in their own copy. It prints per function
the tests passed out of its total, and a total score. A test that does not run
(its file does not import) counts as failed; a skipped one for neither side.
"""

import argparse
import ast
import concurrent.futures
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import grading
import handout

ROOT = handout.ROOT


class GradeError(ValueError):
    """A bad request (unknown function or assignment, no project in DIR): one line for the user."""


def public_functions(project, stages=grading.STAGES):
    """Every function the table must grade, read from the stage files without importing them: top-level
    functions and methods of top-level classes, private ones (a leading _) left out, __init__ kept."""
    found = []
    for stage in stages:
        with open(os.path.join(project, stage + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                found.append(f"{stage}.{node.name}")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found += [f"{stage}.{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)
                          and (not m.name.startswith("_") or m.name == "__init__")]
    return found


def select_functions(only=None, assignment=None):
    """The functions to grade, in the table's order: --only's, an assignment's, or all of them."""
    if assignment is not None:
        if assignment not in grading.ASSIGNMENTS:
            raise GradeError(f"unknown assignment '{assignment}': the assignments are {', '.join(grading.ASSIGNMENTS)}")
        return list(grading.ASSIGNMENTS[assignment][1])
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        for name in names:
            if name not in grading.GRADED_BY:
                raise GradeError(f"'{name}' is not in the grading table (tests/grading.py)"
                                 f"{handout.closest(name, grading.GRADED_BY)}")
        return list(dict.fromkeys(names))
    return list(grading.GRADED_BY)


def tests_of(function):
    """The table's tests of one function as 'test_FILE.py::test_name[case]': a name without its file is in
    the test file of the function's module (bpe.merge_pair: test_bpe.py)."""
    own = f"test_{function.split('.')[0]}.py::"
    return [t if "::" in t else own + t for t in grading.GRADED_BY[function]]


def test_entries(functions):
    """The tests of these functions, each once, in order."""
    return list(dict.fromkeys(t for f in functions for t in tests_of(f)))


def split_entry(entry):
    """'test_bpe.py::test_x[a-b]' -> ('test_bpe.py', 'test_x', '[a-b]'); the case is '' for every case."""
    filename, name = entry.split("::")
    base, bracket, case = name.partition("[")
    return filename, base, bracket + case


def defined_tests(project):
    """{test file: its test function names} for DIR/tests, read without importing anything;
    a file that does not parse defines none."""
    tests_dir, found = os.path.join(project, "tests"), {}
    for filename in sorted(os.listdir(tests_dir)) if os.path.isdir(tests_dir) else []:
        if filename.startswith("test_") and filename.endswith(".py"):
            try:
                with open(os.path.join(tests_dir, filename), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            found[filename] = {n.name for n in tree.body
                               if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}
    return found


def read_junit(path):
    """{'test_bpe.py::test_x[a]': 'passed' | 'failed' | 'skipped'} from pytest's JUnit XML; a case with
    an error in its setup or teardown failed."""
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        if not module:
            continue  # a collection error: that file's tests are missing from the results
        key = f"{module.split('.')[-1]}.py::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        if rank[outcome] >= rank[results.get(key, "passed")]:
            results[key] = outcome
    return results


def student_files(folder):
    """The top-level .py files of a student's copy: the code being graded (tests/ is the grader's)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".py") and os.path.isfile(os.path.join(folder, f)))


def read_source(folder, module):
    """module.py's text in folder and its syntax tree; (None, None) if it is missing or is not Python."""
    try:
        with open(os.path.join(folder, module + ".py"), encoding="utf-8", newline="") as f:
            text = f.read()
        return text, ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None, None


def def_node(tree, function):
    """The def of module.function / module.Class.method in a parsed module, or None."""
    try:
        return handout.find_function(tree, *handout.split_name(function))
    except handout.HandoutError:
        return None


def node_lines(node):
    """(first, last) line of a def or statement, its decorators included (1-based, inclusive)."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno


def changed_functions(folder, reference, functions):
    """The functions whose def in folder differs from the reference's (compared as syntax trees, so
    comments and layout do not count), or that folder lacks."""
    changed = []
    for function in functions:
        module = function.split(".")[0]
        ref_tree, own_tree = read_source(reference, module)[1], read_source(folder, module)[1]
        ref, own = def_node(ref_tree, function), own_tree and def_node(own_tree, function)
        if own is None or ast.dump(own) != ast.dump(ref):
            changed.append(function)
    return changed


def top_level_names(tree):
    """The names a module's top-level statements define, and its imports as text."""
    names, imports = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.add(ast.unparse(node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names, imports


def is_main_guard(node):
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def splice(reference_source, student_source, function):
    """The reference module with one function's def replaced by the student's, and what the student
    added at the top level of the file (imports, helper functions and classes, constants) put in before
    `if __name__ == "__main__"`. None when the student's file has no such function."""
    ref_tree, own_tree = ast.parse(reference_source), ast.parse(student_source)
    ref, own = def_node(ref_tree, function), def_node(own_tree, function)
    if own is None:
        return None
    ref_lines, own_lines = handout.split_lines(reference_source), handout.split_lines(student_source)
    names, imports = top_level_names(ref_tree)
    added = []
    for node in own_tree.body:
        new_import = isinstance(node, (ast.Import, ast.ImportFrom)) and ast.unparse(node) not in imports
        defines = top_level_names(ast.Module(body=[node], type_ignores=[]))[0]
        if new_import or (defines and not defines & names and not is_main_guard(node)):
            first, last = node_lines(node)
            added += own_lines[first - 1:last] + ["\n"]
    guard = next((node_lines(n)[0] for n in ref_tree.body if is_main_guard(n)), len(ref_lines) + 1)
    first, last = node_lines(ref)
    own_first, own_last = node_lines(own)
    lines = (ref_lines[:first - 1] + own_lines[own_first - 1:own_last] + ref_lines[last:guard - 1]
             + added + ref_lines[guard - 1:])
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines)


def grade_alone(folder, reference, functions, out=None):
    """{function: its tests' results}: the functions folder changed, each spliced alone into a scratch
    copy of the reference; the others, one run on the reference itself."""
    changed = changed_functions(folder, reference, functions)
    same = [f for f in functions if f not in changed]
    results_of = dict.fromkeys(same, run_tests(reference, test_entries(same)) if same else {})
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_project(reference, tmp)
        for i, function in enumerate(changed):
            if out:
                print(f"[{i + 1}/{len(changed)}] {function}", file=out, flush=True)
            module = function.split(".")[0]
            original, _ = read_source(copy, module)
            student, tree = read_source(folder, module)
            spliced = splice(original, student, function) if tree else None
            # no such function (or file) in the student's copy: no results, every test fails
            results_of[function] = run_with_module(copy, module, spliced, tests_of(function)) if spliced else {}
    return results_of


def run_with_module(copy, module, source, entries):
    """run_tests in a project copy with module.py replaced by `source`; the file is put back after."""
    path = os.path.join(copy, module + ".py")
    with open(path, encoding="utf-8", newline="") as f:
        original = f.read()
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(source)
        return run_tests(copy, entries)
    finally:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(original)


def run_tests(project, entries):
    """Run the entries' tests once with pytest in project; {case id: outcome} for the cases that ran."""
    defined = defined_tests(project)
    present = [e for e in entries if split_entry(e)[1] in defined.get(split_entry(e)[0], ())]
    if not present:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   f"--junitxml={xml}", *(f"tests/{e}" for e in present)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        if not os.path.exists(xml):
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
            raise GradeError(f"pytest wrote no results in {project} (exit {done.returncode})"
                             + (f": {tail[0]}" if tail else ""))
        return read_junit(xml)


def entry_outcomes(entry, results):
    """[(case id, outcome)] of one table entry: all cases of a test named without [..]; ('missing') if none ran."""
    filename, base, case = split_entry(entry)
    if case:
        return [(entry, results.get(entry, "missing"))]
    cases = [(k, v) for k, v in results.items() if k == entry or k.startswith(entry + "[")]
    return cases or [(entry, "missing")]


def grade(functions, results_of):
    """{function: (passed, total, [(case id, outcome) of each case that did not pass])} from
    results_of[function], its tests' results; skipped cases count for neither side."""
    grades = {}
    for function in functions:
        cases = dict(c for e in tests_of(function) for c in entry_outcomes(e, results_of[function]))
        counted = {k: v for k, v in cases.items() if v != "skipped"}
        failing = [(k, v) for k, v in counted.items() if v != "passed"]
        grades[function] = (len(counted) - len(failing), len(counted), failing)
    return grades


def report(grades, verbose=False):
    """The table printed by grade.py: a row per function (its failing tests too with verbose), then the score."""
    width = max([len("function")] + [len(f) for f in grades]) + 2
    lines = [f"{'function':<{width}}tests passed"]
    for function, (passed, total, failing) in grades.items():
        lines.append(f"{function:<{width}}{passed}/{total}" + ("" if passed == total else "   <-"))
        if verbose:
            lines += [f"    {outcome}: {case}" for case, outcome in failing]
    full = sum(passed == total for passed, total, _ in grades.values())
    passed, total = sum(g[0] for g in grades.values()), sum(g[1] for g in grades.values())
    lines.append(f"score: {full}/{len(grades)} functions pass all their tests ({percent(full, len(grades))}); "
                 f"{passed}/{total} tests pass ({percent(passed, total)})")
    return "\n".join(lines)


def percent(part, whole):
    return f"{100 * part / whole:.0f}%" if whole else "-"


# -----------------------------------------------------------------------------
# --verify: the table's own check, each function blanked in turn

def copy_project(project, dest):
    """A copy of the project's files (handout.project_files) in dest, for blanking one function at a time."""
    for rel in handout.project_files(project):
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or ".", exist_ok=True)
        shutil.copy2(os.path.join(project, rel), os.path.join(dest, rel))
    return dest


def verify_one(copy, function):
    """Blank one function in a project copy, run its grading tests, put the file back.
    Returns (status, the tests that still passed): 'caught' when every test ran and failed."""
    module, _ = handout.split_name(function)
    original, _ = read_source(copy, module)
    blanked = handout.blank_source(original, handout.resolve(copy, [function])[module + ".py"])
    results = run_with_module(copy, module, blanked, tests_of(function))
    outcomes = [c for e in tests_of(function) for c in entry_outcomes(e, results)]
    still_passing = [case for case, outcome in outcomes if outcome == "passed"]
    if not any(outcome in ("failed", "passed") for _, outcome in outcomes):
        return "not run", still_passing
    return ("caught" if not still_passing else "missed" if len(still_passing) == len(outcomes)
            else "partly caught"), still_passing


def verify(project, functions, jobs=1, out=None):
    """verify_one for each function, in `jobs` copies of the project at once, after a baseline run of all
    their tests on the untouched copy. Returns ({function: (status, still passing)}, the tests that failed
    before blanking); printed to out (stdout) as it goes."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        copies = queue.Queue()
        for i in range(jobs):
            copies.put(copy_project(project, os.path.join(tmp, f"copy{i}")))
        baseline = run_tests(os.path.join(tmp, "copy0"), test_entries(functions))
        broken = sorted(k for k, v in baseline.items() if v == "failed")
        if broken:
            print(f"failing before any blanking ({len(broken)}): {', '.join(broken)}", file=out, flush=True)

        def check(function):
            copy = copies.get()
            try:
                return verify_one(copy, function)
            finally:
                copies.put(copy)

        statuses = {}
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for i, (function, (status, passing)) in enumerate(zip(functions, pool.map(check, functions))):
                statuses[function] = (status, passing)
                note = f": still pass {', '.join(passing)}" if passing else ""
                print(f"[{i + 1}/{len(functions)}] {function}: {status}{note}", file=out, flush=True)
    caught = sum(s == "caught" for s, _ in statuses.values())
    print(f"verify: {caught}/{len(functions)} functions caught (every grading test fails when the function is "
          f"blanked)" + (f"; {len(broken)} tests failed before blanking" if broken else ""), file=out)
    return statuses, broken


def main(argv=None):
    parser = argparse.ArgumentParser(prog="grade.py", description="Grade a copy of the project per function: "
                                     "the tests that grade each one (tests/grading.py), passed / total.")
    parser.add_argument("dir", nargs="?", default=ROOT, help="the copy to grade (default: this checkout)")
    parser.add_argument("--reference", default=ROOT, help="the project with the solutions and the tests that "
                        "grade DIR (default: this checkout)")
    parser.add_argument("--assignment", default=None, help="grade only the functions of a named assignment: "
                        + ", ".join(grading.ASSIGNMENTS))
    parser.add_argument("--only", default=None, help="comma-separated functions to grade, e.g. bpe.merge_pair")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the tests that do not pass")
    parser.add_argument("--verify", action="store_true", help="instead of grading: blank each function in a "
                        "copy of DIR and check that all its grading tests fail")
    parser.add_argument("--jobs", type=int, default=1, help="with --verify: copies checked at once")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.dir) or not student_files(args.dir):
            raise GradeError(f"{args.dir} is not a copy of the project: no .py files there to grade")
        if not all(os.path.exists(os.path.join(args.reference, p)) for p in ("pytest.ini", "tests")):
            raise GradeError(f"--reference {args.reference} is not the project (no pytest.ini and tests/ there)")
        if args.only and args.assignment:
            raise GradeError("give --only or --assignment, not both")
        functions = select_functions(args.only, args.assignment)
        if args.verify:
            statuses, broken = verify(args.dir, functions, max(1, args.jobs))
            return 0 if not broken and all(s == "caught" for s, _ in statuses.values()) else 1
        if os.path.realpath(args.dir) == os.path.realpath(args.reference):
            results = run_tests(args.dir, test_entries(functions))
            results_of = dict.fromkeys(functions, results)
        else:
            results_of = grade_alone(args.dir, args.reference, functions, out=sys.stderr)
    except (GradeError, handout.HandoutError, OSError) as e:
        print(f"grade.py: error: {e}", file=sys.stderr)
        return 2
    print(report(grade(functions, results_of), args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
