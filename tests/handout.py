"""
handout.py: a student's copy of the project, with the functions of an assignment blanked.

    python tests/handout.py --assignment transformer --out ../hw2
    python tests/handout.py --blank bpe.merge_pair,model.CausalSelfAttention.forward --out ../hw
    python tests/handout.py --list                  # the named assignments and their functions

Each named function keeps its decorators, signature and docstring; the rest of its
body becomes `raise NotImplementedError("bpe.merge_pair: fill me in")`. Every other
byte of every file is copied as it is, so the copy reads as the original. The copy's
README.md ends with a section that lists what to fill in (file and line) and the
command that grades it per function (tests/grade.py; the table: tests/grading.py).
"""

import argparse
import ast
import difflib
import os
import shutil
import subprocess
import sys
import tokenize

import grading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never part of a copy: git's own files, run outputs, caches.
SKIP_DIRS = {".git", "out", "data", "__pycache__", ".devrun", ".pytest_cache", ".cache", ".benchmarks",
             ".venv", "venv", "env"}


class HandoutError(ValueError):
    """A bad request (unknown or private name, not a function, a used --out): one line for the user."""


# -----------------------------------------------------------------------------
# Which functions: a dotted name -> its node in the module's syntax tree

def split_name(name):
    """'model.GPT.forward' -> ('model', ['GPT', 'forward']); checks the shape of the name only."""
    parts = name.strip().split(".")
    if len(parts) not in (2, 3) or not all(p.isidentifier() for p in parts):
        raise HandoutError(f"'{name}': name a function as module.function or module.Class.method "
                           f"(e.g. bpe.merge_pair, model.GPT.forward)")
    if any(p.startswith("_") and p != "__init__" for p in parts[1:]):
        raise HandoutError(f"'{name}' is private: a handout blanks public functions and methods "
                           f"(a private helper is part of the function that calls it)")
    return parts[0], parts[1:]


def closest(word, choices):
    """' (did you mean X?)' when a choice is close to the word, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def find_function(tree, module, path):
    """The FunctionDef of module.path in a parsed module; a HandoutError that says what is there instead."""
    name = ".".join([module, *path])
    scope, where = tree.body, f"{module}.py"
    for i, part in enumerate(path):
        defs = {n.name: n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        node = defs.get(part)
        if node is None:
            assigned = {t.id for n in scope if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            if part in assigned:
                raise HandoutError(f"'{name}' is not a function: {part} is a value assigned in {where}")
            public = [n for n in defs if not n.startswith("_")]
            kind = "function or class" if i == 0 else "method"
            raise HandoutError(f"no {kind} '{part}' in {where}{closest(part, public)}")
        if i == len(path) - 1:
            if isinstance(node, ast.ClassDef):
                methods = [n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
                example = f" (e.g. {name}.{methods[0]})" if methods else ""
                raise HandoutError(f"'{name}' is a class, not a function: name one of its methods{example}")
            return node
        if not isinstance(node, ast.ClassDef):
            raise HandoutError(f"'{name}': {'.'.join([module, *path[:i + 1]])} is a function, not a class")
        scope, where = node.body, f"class {part} of {module}.py"


def resolve(root, names):
    """{file name: [(dotted name, FunctionDef), ...]} for names like bpe.merge_pair, checked against the
    sources in root (a top-level MODULE.py per module); a HandoutError for the first bad name."""
    found, trees = {}, {}
    modules = sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        module, path = split_name(name)
        if module not in modules:
            raise HandoutError(f"unknown module '{module}' in '{name}': no {module}.py in {root}"
                               f"{closest(module, modules)}")
        filename = module + ".py"
        if filename not in trees:
            with open(os.path.join(root, filename), encoding="utf-8") as f:
                trees[filename] = ast.parse(f.read(), filename)
        found.setdefault(filename, []).append((name, find_function(trees[filename], module, path)))
    if not found:
        raise HandoutError("no functions named: give --blank module.function,... or --assignment NAME")
    return found


# -----------------------------------------------------------------------------
# Blanking: rewrite the body's lines only

def header_end(lines, node):
    """(line, column) just after the ':' that ends the def's signature (1-based line, 0-based column)."""
    first = node.body[0]
    text = iter(lines[node.lineno - 1:first.end_lineno])
    end = None
    # The last ':' before the first statement closes the signature: whatever follows it up to
    # the body is comments and newlines, which tokenize skips.
    for tok in tokenize.generate_tokens(lambda: next(text, "")):
        line, col = tok.start[0] + node.lineno - 1, tok.start[1]
        if (line, col) >= (first.lineno, char_col(lines, first.lineno, first.col_offset)):
            break
        if tok.type == tokenize.OP and tok.string == ":":
            end = (line, col + 1)
    return end


def char_col(lines, lineno, byte_col):
    """ast gives columns in UTF-8 bytes; text columns count characters."""
    return len(lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8"))


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def blank_function(lines, node, name):
    """Replace node's body after its docstring by one raise, in place in `lines` (a list of lines with
    their endings). The signature, decorators, docstring and every line outside the body stay as they are."""
    raise_text = f'raise NotImplementedError("{name}: fill me in")'
    if has_docstring(node):
        doc = node.body[0]
        keep = (doc.end_lineno, char_col(lines, doc.end_lineno, doc.end_col_offset))
        rest = node.body[1:]
    else:
        keep, rest = header_end(lines, node), node.body
    anchor = rest[0] if rest else node.body[0]
    indent_line = lines[anchor.lineno - 1]
    indent = indent_line[:len(indent_line) - len(indent_line.lstrip())]
    last = lines[node.end_lineno - 1]
    newline = last[len(last.rstrip("\r\n")):] or "\n"
    if rest and rest[0].lineno == keep[0]:
        # The body shares a line with the signature or the docstring (def f(x): return x):
        # cut from the first statement to the end of the last one, keep what surrounds them.
        start_col = char_col(lines, rest[0].lineno, rest[0].col_offset)
        end_col = char_col(lines, node.end_lineno, node.end_col_offset)
        head, tail = lines[rest[0].lineno - 1][:start_col], lines[node.end_lineno - 1][end_col:]
        lines[rest[0].lineno - 1:node.end_lineno] = [head + raise_text + tail]
    elif rest:
        # Everything from the line after the kept part through the last statement, comments included:
        # they explain the solution.
        lines[keep[0]:node.end_lineno] = [indent + raise_text + newline]
    else:
        lines[keep[0]:keep[0]] = [indent + raise_text + newline]  # a docstring-only body


def split_lines(source):
    """The lines with their endings, cut at '\n' only: as Python numbers lines (str.splitlines would also
    cut at a form feed or a Unicode line separator inside a string)."""
    lines = source.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def blank_source(source, functions):
    """The source with each (name, FunctionDef) of `functions` blanked; the nodes come from parsing `source`."""
    lines = split_lines(source)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
        added_newline = True
    else:
        added_newline = False
    # Bottom up, so that the line numbers of the functions still to blank stay right.
    for name, node in sorted(functions, key=lambda f: f[1].lineno, reverse=True):
        blank_function(lines, node, name)
    text = "".join(lines)
    if added_newline:
        text = text[:-1]
    ast.parse(text)  # a blanked file must still be Python
    return text


def def_lines(source, names):
    """{dotted name: line of its def} in a source: where a student finds each function in the copy."""
    tree = ast.parse(source)
    return {name: find_function(tree, *split_name(name)).lineno for name in names}


# -----------------------------------------------------------------------------
# The copy

def project_files(root):
    """The project's files, relative to root: what git tracks or would track (ignored files left out),
    or, outside a git checkout, a walk that skips run outputs and caches."""
    try:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split("\0")
        files = [f for f in listed if f and os.path.isfile(os.path.join(root, f))]
        return sorted(f for f in dict.fromkeys(files) if not SKIP_DIRS & set(f.split("/")[:-1]))
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not n.endswith(".pyc")]
    return sorted(files)


def check_out_dir(root, out, force):
    """Refuse an --out that would mix the copy into the project or into other files."""
    out_abs, root_abs = os.path.realpath(out), os.path.realpath(root)
    if out_abs == root_abs or out_abs.startswith(root_abs + os.sep):
        raise HandoutError(f"--out {out} is inside the project {root}: give a folder outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise HandoutError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise HandoutError(f"--out {out} exists and is not empty: give a new folder, or --force to write "
                           f"the copy's files over it (other files there are left alone)")


def readme_section(lines_of, assignment=None):
    """The Markdown appended to the copy's README: what to fill in, where, and how it is graded."""
    title = grading.ASSIGNMENTS[assignment][0] if assignment else ""
    if assignment and set(lines_of) == set(grading.ASSIGNMENTS[assignment][1]):
        grade = f"python tests/grade.py --assignment {assignment}"
    else:
        grade = f"python tests/grade.py --only {','.join(lines_of)}"
    rows = "\n".join(f"| `{name}` | `{file}:{line}` |" for name, (file, line)
                     in sorted(lines_of.items(), key=lambda item: item[1]))
    return (f"\n## Your assignment{': ' + title if title else ''}\n\n"
            "Fill in these functions. Each one now raises `NotImplementedError`; its\n"
            "signature and docstring say what it takes and returns.\n\n"
            f"| function | where |\n|---|---|\n{rows}\n\n"
            + "Your grade, per function (tests passed / total), and the tests that do not pass yet:\n\n"
            f"```bash\n{grade}\n{grade} -v\n```\n\n"
            "In your copy a function that uses another one of yours fails its tests until both work\n"
            "(the whole suite too: later stages call earlier ones). Your instructor grades each\n"
            "function alone, with the original of everything else.\n")


def write_handout(root, out, names, assignment=None, force=False):
    """Copy the project at root to out with the named functions blanked and the README section added.
    Returns {dotted name: (file, line in the copy)}. Checks every name before writing anything."""
    found = resolve(root, names)
    check_out_dir(root, out, force)
    blanked = {}
    for filename, functions in found.items():
        with open(os.path.join(root, filename), encoding="utf-8", newline="") as f:
            blanked[filename] = blank_source(f.read(), functions)
    where = {}
    for filename, functions in found.items():
        lines = def_lines(blanked[filename], [name for name, _ in functions])
        where.update({name: (filename, lines[name]) for name, _ in functions})
    where = {name: where[name] for name in dict.fromkeys(n.strip() for n in names if n.strip())}
    for rel in project_files(root):
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        if rel in blanked:
            with open(dest, "w", encoding="utf-8", newline="") as f:
                f.write(blanked[rel])
        else:
            shutil.copy2(os.path.join(root, rel), dest)
    readme = os.path.join(out, "README.md")
    text = open(readme, encoding="utf-8").read() if os.path.exists(readme) else ""
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text + ("\n" if text and not text.endswith("\n") else "") + readme_section(where, assignment))
    return where


def assignment_functions(name):
    """The functions of a named assignment; a HandoutError naming the assignments for another name."""
    if name not in grading.ASSIGNMENTS:
        raise HandoutError(f"unknown assignment '{name}': the assignments are {', '.join(grading.ASSIGNMENTS)}")
    return grading.ASSIGNMENTS[name][1]


def list_assignments():
    """The named assignments, one paragraph each: name, title, functions."""
    return "\n".join(f"{name}: {title}\n  " + "\n  ".join(functions) + "\n"
                     for name, (title, functions) in grading.ASSIGNMENTS.items())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="handout.py", description="Write a copy of the project with the "
                                     "named functions blanked (signature and docstring kept) for students.")
    parser.add_argument("--blank", default="", help="comma-separated functions: module.function or "
                        "module.Class.method, e.g. bpe.merge_pair,model.GPT.forward")
    parser.add_argument("--assignment", default=None, help="a named set (see --list): "
                        + ", ".join(grading.ASSIGNMENTS))
    parser.add_argument("--out", help="the folder to write the copy to (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (its other files are kept)")
    parser.add_argument("--root", default=ROOT, help="the project to copy (default: this checkout)")
    parser.add_argument("--list", action="store_true", help="print the named assignments and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(list_assignments(), end="")
        return 0
    try:
        if not args.out:
            raise HandoutError("--out DIR is required: the folder to write the copy to")
        names = args.blank.split(",") + (assignment_functions(args.assignment) if args.assignment else [])
        where = write_handout(args.root, args.out, names, args.assignment, args.force)
    except (HandoutError, OSError) as e:
        print(f"handout.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(where)} function{'s' * (len(where) != 1)} to fill in "
          f"(listed at the end of its README.md)")
    for name, (filename, line) in where.items():
        print(f"  {name:<40} {filename}:{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
