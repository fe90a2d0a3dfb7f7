#!/usr/bin/env python3
"""Fails when the source files of a crate import each other in a loop.

A module is one file (`a/mod.rs` is module `a`). An edge runs from a file to the module that a
`crate::...` or `super::...` path in it names (the longest existing module on that path).
Edges between a module and its own ancestors do not count: a parent declares and uses its
children, and a child may use what its parent defines, as Rust's module tree intends. Unit
tests (`#[cfg(test)] mod tests`, at the end of a file) may import anything and are skipped.
Exits 1 and prints each loop (a strongly connected component of more than one module).
"""
import os
import re
import sys

CRATES = ["design", "proto", "coordinator", "kernels", "worker", "cli"]
PATH = re.compile(r"\b(crate|super)((?:::\{?\s*[A-Za-z_][A-Za-z0-9_]*)+)")


def modules(src):
    found = {}
    for folder, _, files in os.walk(src):
        for name in files:
            if name.endswith(".rs"):
                parts = os.path.relpath(os.path.join(folder, name), src)[:-3].split("/")
                if parts[-1] in ("mod", "lib", "main"):
                    parts = parts[:-1]
                found["::".join(parts)] = os.path.join(folder, name)
    return found


def edges(mods, module, path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", text, flags=re.S)
    text = "\n".join(line for line in text.split("\n") if not line.strip().startswith("//"))
    current = module.split("::") if module else []
    directory = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
    for match in PATH.finditer(text):
        segments = [s.strip("{ ") for s in match.group(2).split("::") if s.strip("{ ")]
        base = [] if match.group(1) == "crate" else (current[:-1] if directory or current else [])
        if match.group(1) == "super" and not directory:
            base = current[:-1]
        for n in range(len(base + segments), -1, -1):
            target = "::".join((base + segments)[:n])
            if target in mods:
                break
        related = target == module or module.startswith(target + "::") or target.startswith(module + "::")
        if target and module and not related:
            yield target


def loops(graph):
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    failed = False
    for crate in CRATES:
        mods = modules(os.path.join(root, crate, "src"))
        graph = {m: set(edges(mods, m, p)) for m, p in mods.items()}
        for component in loops(graph):
            failed = True
            print(f"{crate}: import loop between {', '.join(component)}")
        print(f"{crate}: {len(mods)} files, {sum(map(len, graph.values()))} imports between them")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
