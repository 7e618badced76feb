#!/usr/bin/env python3
"""No import cycles among the daemon's modules (part of tools/test.sh).

Two levels are checked, test code excluded (files named tests.rs, and everything from a
`#[cfg(test)]` module to the end of a file):
  1. top-level modules of daemon/src (config, model, pipeline, telemetry, ...): a file under X
     that names `crate::Y` (Y != X) is an edge X -> Y;
  2. siblings inside each module directory (pipeline/decode/{json,cbor,envelope,sink}, app/...):
     a file under child A of P naming `crate::P::B`, or `super::B` from A itself, is A -> B.
A parent using its own children is containment, not an edge. Comments are ignored.

Prints each cycle found and exits 1; prints the top-level order and exits 0 otherwise.
    tools/check-modules.py [daemon/src]
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "daemon/src")


def module_path(f: Path) -> tuple:
    rel = f.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def code(f: Path) -> str:
    text = f.read_text()
    m = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\([a-z]+\))?\s+)?mod \w+", text, re.M)
    if m:
        text = text[: m.start()]
    return strip(text)


def strip(text: str) -> str:
    """The code without comments, string and char literals (a `crate::x` there is no import)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            j = text.find('"' + hashes, i + 2 + len(hashes))
            i = n if j < 0 else j + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            i += re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def children(mod: tuple) -> set:
    return {m[len(mod)] for m in modules if len(m) > len(mod) and m[: len(mod)] == mod}


files = [f for f in root.rglob("*.rs") if f.name != "tests.rs"]
modules = {module_path(f) for f in files}

top = defaultdict(set)
siblings = defaultdict(lambda: defaultdict(set))  # parent -> child -> {child}
for f in files:
    mod = module_path(f)
    if not mod or mod[0] in ("main",):
        continue
    text = code(f)
    for path in re.findall(r"\bcrate((?:::\w+)+)", text):
        names = path.strip(":").split("::")
        if names[0] != mod[0]:
            top[mod[0]].add(names[0])
        # Sibling edges at every depth where the two paths share a parent.
        for d in range(1, min(len(mod), len(names))):
            if tuple(names[:d]) == mod[:d] and names[d] != mod[d] and names[d] in children(mod[:d]):
                siblings[mod[:d]][mod[d]].add(names[d])
                break
    # `super::B` from a file directly in P's child A (A -> B when B is a module of P).
    if len(mod) >= 2:
        parent, me = mod[:-1], mod[-1]
        for b in re.findall(r"\bsuper::(\w+)", text):
            if b != me and b in children(parent):
                siblings[parent][me].add(b)


def cycles(graph: dict) -> list:
    """Every elementary cycle's node list, found by DFS (graphs here are small)."""
    found, seen = [], set()

    def dfs(node, stack, on_stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                cyc = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc)
            elif len(stack) < 12:
                dfs(nxt, stack + [nxt], on_stack | {nxt})

    for n in sorted(graph):
        dfs(n, [n], {n})
    return found


bad = []
for cyc in cycles(top):
    bad.append("crate: " + " -> ".join(cyc))
for parent, g in sorted(siblings.items()):
    for cyc in cycles(g):
        bad.append("::".join(parent) + ": " + " -> ".join(cyc))
if bad:
    print("import cycles among daemon modules (test code excluded):")
    for b in bad:
        print("  " + b)
    sys.exit(1)

# Report the layering (a topological order, lowest first).
order, done = [], set()


def visit(n):
    if n in done:
        return
    done.add(n)
    for m in sorted(top.get(n, ())):
        visit(m)
    order.append(n)


for n in sorted({m[0] for m in modules if m}):
    visit(n)
print("no import cycles; top-level modules, lowest first: " + " ".join(order))
